"""Data preparation: the sample set, COCO, text corpora, tokenisation, vocabularies, downloads."""

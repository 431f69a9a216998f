"""Data preparation: the sample set, COCO, text corpora, tokenisation, vocabularies, downloads."""

SPLITS = ("train", "val", "test")  # every prepared data set's splits, in this order

"""The special tokens every vocabulary starts with, and their fixed ids (models, decoding and data share them)."""

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every vocabulary
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

"""A model family from outside capline, as a user's package registers it (tests/test_plugin_family.py).

Its entry point (group `capline.families`) names FAMILY; the record names its params schemas and its
LightningModule by import path, so registering it imports nothing heavy.
"""

from pipeline.families import Family

FAMILY = Family("bigram_lm", "language_model", "val/loss", "min",
                module="tests.plugin_family.module:BigramLmModule",
                model_params="tests.plugin_family.params:BigramLmParams",
                train_params="pipeline.params:OptimParams")

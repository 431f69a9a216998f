"""The HTML report: figures, sections and a self-contained page (see stages/report.py).

blocks.py   what sections hold          figures.py  matplotlib figures -> PNG (and MLflow)
examples.py what evaluate@ writes for the report (captions, attention, samples): written there, read here
sources.py  reading the pipeline's outputs   sections.py  one builder per section
build.py    inputs -> sections, step by step  html.py  the page      browser.py  headless Chromium
Nothing here loads a model or decodes: the report renders files (tests/report checks it imports no torch).
"""

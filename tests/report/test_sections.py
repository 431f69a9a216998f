"""Section builders on hand-made inputs, and the HTML page they render to (escaping, determinism)."""

from __future__ import annotations

import numpy as np

from pipeline.report.blocks import Example, Figure, Sample, Section, Table, Text
from pipeline.report.examples import CaptionExample, LanguageModelSamples
from pipeline.report.figures import FigureSink
from pipeline.report.html import fmt, render
from pipeline.report.sections import (
    LanguageModelData,
    SweepData,
    captioner_section,
    embeddings_section,
    language_models_section,
    metrics_section,
    sweeps_section,
)
from pipeline.report.sources import CaptionedImage

SPACE = {"train.lstm_lm.lr": {"loguniform": [1e-3, 1e-2]}, "models.lstm_lm.cell": {"choice": ["lstm", "gru"]}}


def blocks_of(section: Section, kind: type) -> list:
    return [b for b in section.blocks if isinstance(b, kind)]


def test_metrics_tables_with_and_without_a_diff():
    files = {"evaluate_lstm_lm.json": {"bits_per_char": 2.5, "tokens": 100}, "vocab.json": {"words": 40}}
    plain = metrics_section(files, None, "no previous commit to compare with (why)")
    assert blocks_of(plain, Text)[0].text == "no previous commit to compare with (why)"
    assert [(t.caption, t.rows) for t in blocks_of(plain, Table)] == [
        ("evaluate_lstm_lm.json", [["bits_per_char", 2.5], ["tokens", 100]]), ("vocab.json", [["words", 40]])]
    diff = {"evaluate_lstm_lm.json": {"bits_per_char": {"old": 2.75, "new": 2.5, "diff": -0.25}}}
    tables = blocks_of(metrics_section(files, diff, "change since the last commit (HEAD)"), Table)
    assert tables[0].columns == ["metric", "value", "HEAD", "change"]
    assert tables[0].rows == [["bits_per_char", 2.5, 2.75, -0.25], ["tokens", 100, None, None]]
    assert tables[1].rows == [["words", 40, None, None]]
    assert metrics_section({}, None, "").missing


def captioned(attention: bool) -> list[CaptionedImage]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    att = rng.dirichlet(np.ones(16), 4).astype(np.float16) if attention else None  # (T, N): 3 words + <end>
    example = CaptionExample(3, 7, "000007.jpg", ["a", "red", "circle", "."], ["a red circle", "one red circle"],
                             "a red circle.", att)
    return [CaptionedImage(example, image)]


def test_captioner_examples_with_attention_strips_and_their_mlflow_names():
    logged = []
    sink = FigureSink(lambda run, fig, name: logged.append((run, name)) or True)
    section = captioner_section(captioned(True), "", {"bleu_4": 0.5, "cider": 1.0, "other": 3}, "show_attend_tell",
                                True, sink, "run1")
    example = blocks_of(section, Example)[0]
    assert (example.generated, example.references) == ("a red circle.", ["a red circle", "one red circle"])
    assert example.title == "image 7 (000007.jpg)"
    assert example.attention is not None and example.image.png.startswith(b"\x89PNG")
    assert example.attention.caption == "attention of each word of: a red circle."
    assert blocks_of(section, Table)[0].columns == ["system", "bleu_4", "cider"]
    assert blocks_of(section, Table)[0].rows == [["model", 0.5, 1.0]]
    assert logged == [("run1", "report/captioner/test_0.png"), ("run1", "report/captioner/attention_0.png")]
    assert not blocks_of(section, Text)  # the model attends: nothing to explain
    no_maps_kept = captioner_section(captioned(False), "", None, "show_attend_tell", True, FigureSink(), None)
    assert blocks_of(no_maps_kept, Example)[0].attention is None and not blocks_of(no_maps_kept, Text)


def test_captioner_scores_show_the_nearest_neighbour_baseline_beside_the_model():
    scores = {"bleu_4": 0.5, "cider": 1.0, "nn_bleu_4": 0.2, "nn_cider": 0.8}
    (table,) = blocks_of(captioner_section(captioned(False), "", scores, "show_tell", False, FigureSink(), None),
                         Table)
    assert table.rows == [["model", 0.5, 1.0], ["nearest training image's caption", 0.2, 0.8]]


def test_captioner_without_attention_says_why_and_missing_model_says_what_to_run():
    section = captioner_section(captioned(False), "", None, "show_tell", False, FigureSink(), None)
    assert blocks_of(section, Example)[0].attention is None
    assert "arch show_tell has no per-word soft attention" in blocks_of(section, Text)[0].text
    gone = captioner_section(None, "No test captions yet (run: dvc repro evaluate@captioner).", None, "", False,
                             FigureSink(), None)
    assert gone.missing and blocks_of(gone, Text)[0].note


def test_sweeps_without_trials_show_the_summary_and_why():
    summary = {"trials": 4, "completed": 3, "early_stopped": 1, "errored": 0, "best_metric": 1.7,
               "best_config": {"train.lstm_lm.lr": 0.004, "models.lstm_lm.cell": "gru"}, "best_trial_id": "t2",
               "parent_run_id": "abc", "asha_savings": 0.25, "wall_seconds": 10.0}
    data = SweepData("lstm_lm", "val/loss", "min", SPACE, summary, None, "MLflow run abc is not in sqlite:///x")
    section = sweeps_section([data, SweepData("captioner", "val/cider", "max", SPACE, None, None)], FigureSink())
    assert not section.missing
    tables = blocks_of(section, Table)
    assert tables[1].rows == [["train.lstm_lm.lr", 0.004], ["models.lstm_lm.cell", "gru"]]
    notes = [t.text for t in blocks_of(section, Text)]
    assert notes == ["lstm_lm: per-trial results unavailable (MLflow run abc is not in sqlite:///x).",
                     "captioner: no sweep yet (run: dvc repro sweep@captioner)."]
    assert not blocks_of(section, Figure)
    assert sweeps_section([SweepData("x", "m", "min", SPACE, None, None)], FigureSink()).missing


def test_language_models_show_scores_ratio_and_one_sample_per_temperature():
    scores = {"level": "char", "test_loss": 1.5, "perplexity": 4.48, "bits_per_char": 2.0,
              "unigram_bits_per_char": 4.0}
    samples = LanguageModelSamples("The ", 2, 1, [(0.5, "The ab"), (1.0, "The cd")])
    section = language_models_section([LanguageModelData("lstm_lm", scores, samples),
                                       LanguageModelData("transformer_lm", None, None)])
    table = blocks_of(section, Table)[0]
    assert table.columns[-1] == "bits / unigram bits" and table.rows[0][-1] == 0.5
    assert [(s.label, s.text) for s in blocks_of(section, Sample)] == [
        ("lstm_lm, temperature 0.5, prompt 'The '", "The ab"), ("lstm_lm, temperature 1, prompt 'The '", "The cd")]
    assert "transformer_lm: no samples yet (run: dvc repro evaluate@transformer_lm)" in blocks_of(section, Text)[0].text


def test_embeddings_neighbours_and_projection():
    summary = {"method": "skipgram", "dim": 8, "probe": {"red": [["blue", 0.91234], ["green", 0.5]]},
               "missing_probe_words": ["zebra"]}
    section = embeddings_section(summary, ["a", "b", "c"], np.eye(3)[:, :2], FigureSink(), None)
    assert blocks_of(section, Table)[0].rows == [["red", "blue (0.91), green (0.50)"]]
    assert "Not in the vocabulary: zebra." in [t.text for t in blocks_of(section, Text)]
    assert len(blocks_of(section, Figure)) == 1
    lonely = embeddings_section(summary, ["a"], None, FigureSink(), None)
    assert not blocks_of(lonely, Figure)
    assert embeddings_section(None, [], None, FigureSink(), None).missing


def test_every_text_is_escaped():
    evil = '<script>alert("x")</script>'
    sections = [Section("s", evil, [Text(evil), Table(evil, [evil], [[evil, 1.23456]]), Sample(evil, evil),
                                    Example(evil, Figure(evil, b"png"), evil, [evil])])]
    page = render(sections)
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") >= 9
    assert '<td class="num">1.235</td>' in page


def test_render_is_deterministic_and_formats_cells():
    sections = [Section("a", "A", [Table("t", ["x"], [[None], [True], [3], [0.000123456], [float("nan")]])])]
    assert render(sections) == render(sections)
    assert [fmt(v) for v in (None, True, 3, 0.000123456, float("nan"), "s")] == ["", "true", "3", "0.0001235",
                                                                                   "nan", "s"]

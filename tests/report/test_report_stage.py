"""The report stage end to end on tiny trained models: every section, deterministic, figures in MLflow, and
rendered from what evaluate@ wrote (no checkpoint, no model code)."""

from __future__ import annotations

import ast
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.data.coco import read_captions
from pipeline.data.tokenize import detokenize
from pipeline.inference import caption_images, generate
from pipeline.report.examples import examples_dir, read_caption_examples
from pipeline.training.checkpoints import checkpoint_path, load_module
from stages import report as report_stage
from tests.conftest import ROOT
from tests.report.conftest import SWEPT, report_params

SECTIONS = ("captioner", "curves", "sweeps", "language-models", "embeddings", "metrics")


def page(p) -> str:
    return report_stage.report_path(p).read_text(encoding="utf-8")


def section(text: str, section_id: str) -> str:
    """The HTML of one <section> of the page."""
    match = re.search(rf'<section id="{section_id}"[^>]*>(.*?)</section>', text, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def test_every_section_is_shown_and_the_page_is_self_contained(built):
    p, metrics = built
    text = page(p)
    assert metrics["sections"] == dict.fromkeys(SECTIONS, "shown")
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # images embedded, links only within the page
    assert metrics["html_bytes"] == len(text.encode("utf-8"))
    written = json.loads((Path(p.paths.metrics) / "report.json").read_text())
    ignore = {"mlflow_run_id"}  # each run of the stage is a new MLflow run (other tests rerun it)
    assert {k: v for k, v in written.items() if k not in ignore} == {k: v for k, v in metrics.items()
                                                                     if k not in ignore}


def test_captioned_test_images_are_evaluations_and_match_the_models_beam_search_on_the_image_files(built):
    p, _ = built
    part = section(page(p), "captioner")
    records = read_captions(Path(p.paths.coco) / "test" / "captions.jsonl")[: p.report.test_images]
    files = [Path(p.data.coco.images) / rec["file_name"] for rec in records]
    module = load_module("captioner", checkpoint_path(p, "captioner"))
    expected = caption_images(module, files, p.evaluate.beam_size, p.evaluate.alpha,
                              no_repeat_ngram=p.evaluate.no_repeat_ngram)
    generated = [html.unescape(g) for g in re.findall(r"<strong>generated:</strong> (.*?)</p>", part)]
    assert generated == [c.text for c in expected]
    written = read_caption_examples(examples_dir(p, "captioner"))  # what evaluate@captioner wrote and scored
    assert generated == [ex.caption for ex in written.images]
    assert [ex.file_name for ex in written.images] == [rec["file_name"] for rec in records]
    for rec in records:
        for caption in rec["captions"]:
            assert f"<li>{html.escape(detokenize(caption), quote=True)}</li>" in part  # as a reader writes it
    assert part.count("attention of each word of:") == 2 * p.report.attention_images  # alt text + caption
    assert module.model_cfg.arch == "show_attend_tell"


def test_language_model_samples_and_scores(built):
    p, _ = built
    part = section(page(p), "language-models")
    shown = [(label, html.unescape(text)) for label, text in
             re.findall(r'<h3>(.*?)</h3>\s*<pre class="sample">(.*?)</pre>', part, re.S)]
    expected = []
    for family in ("lstm_lm", "transformer_lm"):
        module = load_module(family, checkpoint_path(p, family))
        expected += [(f"{family}, temperature {t:g}, prompt &#39;{p.report.prompt}&#39;",
                      generate(module, p.report.prompt, p.evaluate.sample_length, t, seed=p.seed))
                     for t in p.evaluate.temperatures]
    assert shown == expected
    for family in ("lstm_lm", "transformer_lm"):
        scores = json.loads((Path(p.paths.metrics) / f"evaluate_{family}.json").read_text())
        assert f"{scores['bits_per_char']:.4g}" in part and f"{scores['perplexity']:.4g}" in part


def test_sweep_section_has_both_figures_the_best_config_and_says_which_sweeps_are_missing(built):
    p, _ = built
    part = section(page(p), "sweeps")
    summary = json.loads((Path(p.paths.metrics) / f"sweep_{SWEPT}.json").read_text())
    assert f"{SWEPT}: best configuration (trial {summary['best_trial_id']})" in part
    for key, value in summary["best_config"].items():
        shown = format(value, ".4g") if isinstance(value, float) else str(value)
        assert re.search(rf"<td>{re.escape(key)}</td><td[^>]*>{re.escape(shown)}</td>", part)
    assert f"{SWEPT}: parallel coordinates of the trials" in part
    assert "against each hyperparameter" in part
    assert "captioner: no sweep yet (run: dvc repro sweep@captioner)" in part


def test_figures_are_logged_to_the_runs_they_describe(built):
    p, metrics = built
    uri = p.tracking.uri
    train_run = json.loads((Path(p.paths.metrics) / "train_captioner.json").read_text())["run_id"]
    assert {"report/learning_curve.png", "report/captioner"} <= set(tracking.list_artifacts(uri, train_run, "report"))
    assert "report/captioner/attention_0.png" in tracking.list_artifacts(uri, train_run, "report/captioner")
    sweep_run = json.loads((Path(p.paths.metrics) / f"sweep_{SWEPT}.json").read_text())["parent_run_id"]
    assert {"report/metric_vs_params.png", "report/parallel_coordinates.png"} <= set(
        tracking.list_artifacts(uri, sweep_run, "report"))
    own = tracking.list_artifacts(uri, metrics["mlflow_run_id"], "report")
    assert {"report/index.html", "report/embeddings_pca.png"} <= set(own)
    assert tracking.get_run(uri, metrics["mlflow_run_id"])["status"] == "FINISHED"
    assert metrics["mlflow_figures"] > 0


def test_same_inputs_give_the_same_page(built):
    p, _ = built
    first = page(p)
    report_stage.run(p, repo_dir=Path(p.paths.reports).parent, progress=False)
    assert page(p) == first


def test_missing_parts_are_named_with_what_to_run(prepared_params, tmp_path):
    p = report_params(prepared_params, tmp_path)
    metrics = report_stage.run(p, repo_dir=tmp_path, progress=False)
    assert set(metrics["sections"].values()) == {"missing"}
    text = page(p)
    for needed in ("dvc repro evaluate@captioner", "dvc repro evaluate@lstm_lm", "dvc repro sweep@transformer_lm",
                   "lstm_lm: no samples yet (run: dvc repro evaluate@lstm_lm)", "dvc repro embeddings",
                   "No metrics files yet"):
        assert needed in text
    assert all(f'<section id="{s}" class="missing">' in text for s in SECTIONS)


def test_a_malformed_input_names_the_file_and_writes_nothing(prepared_params, tmp_path):
    p = report_params(prepared_params, tmp_path, **{"report.log_to_mlflow": False})
    bad = Path(p.paths.metrics) / "evaluate_lstm_lm.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: expected a JSON object")):
        report_stage.run(p, repo_dir=tmp_path, progress=False)
    assert not report_stage.report_path(p).exists()
    assert not (Path(p.paths.metrics) / "report.json").exists()


def test_the_page_is_the_same_with_the_checkpoints_gone_and_no_model_code_runs(built, tmp_path):
    """Everything shown comes from evaluate@'s files and the prepared data: without any model the page is equal,
    and building it imports neither torch nor the code that decodes."""
    p, _ = built
    metrics = tmp_path / "metrics"
    shutil.copytree(p.paths.metrics, metrics)
    alone = report_params_like(p, **{"paths.models": str(tmp_path / "no-models"), "paths.metrics": str(metrics),
                                     "paths.reports": str(tmp_path / "reports"), "report.log_to_mlflow": False})
    assert not Path(alone.paths.models).exists()
    (tmp_path / "params.json").write_text(json.dumps(alone.to_dict()))
    code = ("import json, sys; from pipeline.params import validate_params; from stages import report; "
            "shown = report.run(validate_params(json.load(open(sys.argv[1]))), repo_dir=sys.argv[2], progress=False); "
            f"print(json.dumps([shown['sections'], sorted(m for m in sys.modules if m.startswith({MODEL_CODE!r}))]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.json"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    sections, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert sections == dict.fromkeys(SECTIONS, "shown")
    assert imported == []
    assert page(alone) == page(p)


def report_params_like(p, **overrides: object):
    """`p` with some keys changed (and validated again)."""
    from pipeline.params import apply_overrides, validate_params

    return validate_params(apply_overrides(p.to_dict(), overrides))


def test_a_damaged_examples_file_names_itself(built, tmp_path):
    p, _ = built
    folder = tmp_path / "evaluation"
    shutil.copytree(p.paths.evaluation, folder)
    bad = folder / "lstm_lm" / "samples.json"
    bad.write_text(json.dumps({"prompt": "The ", "samples": "not a list"}))
    alone = report_params_like(p, **{"paths.evaluation": str(folder), "paths.reports": str(tmp_path / "reports"),
                                     "paths.metrics": str(tmp_path / "metrics"), "report.log_to_mlflow": False})
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not a samples file")):
        report_stage.run(alone, repo_dir=tmp_path, progress=False)


# Modules the report must not import: decoding, models, checkpoints and the evaluation that runs them.
MODEL_CODE = ("torch", "pipeline.training", "pipeline.decoding", "pipeline.inference", "pipeline.evaluation",
              "pipeline.models")


def imports_of(path: Path) -> set[tuple[str, tuple[str, ...]]]:
    """(module, names) of every import in a file, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, ()) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add((node.module or "", tuple(sorted(alias.name for alias in node.names))))
    return found


@pytest.mark.parametrize("path", sorted([*(ROOT / "pipeline" / "report").glob("*.py"), ROOT / "stages" / "report.py"]),
                         ids=lambda path: path.name)
def test_the_report_imports_no_model_code(path):
    rel = path.relative_to(ROOT).as_posix()
    bad = sorted((module, names) for module, names in imports_of(path) if module.startswith(MODEL_CODE))
    assert bad == [], f"{rel} imports model code: {bad}"
    assert "load_module" not in path.read_text(encoding="utf-8")

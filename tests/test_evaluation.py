"""Evaluation, inference and the train/evaluate/caption/generate commands on tiny trained models."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline import decoding
from pipeline.cli import app
from pipeline.data.coco import read_captions
from pipeline.data.tokenize import detokenize
from pipeline.evaluation import evaluate, run_evaluation
from pipeline.inference import caption_images, generate, prompt_ids
from pipeline.metrics import caption_scores
from pipeline.params import apply_overrides, load_params, validate_params
from pipeline.rerank import consensus, rerank
from pipeline.served_files import caption_neighbours
from pipeline.training.checkpoints import checkpoint_path, load_module
from pipeline.training.fit import build_datamodule, build_module, train, vocabulary
from tests.conftest import ROOT, overrides_under

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(prepared_params, tmp_path_factory) -> dict:
    """Each family trained for one tiny epoch; returns the params (as --set overrides) and checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    overrides = {**overrides_under(prepared_params, root), "paths.evaluation": str(root / "evaluation")}
    p = load_params(ROOT / "params.yaml", overrides)
    for family in ("captioner", "lstm_lm", "transformer_lm"):
        train(p, family, logger=False)
    return {"params": p, "set": [f"{k}={json.dumps(v)}" for k, v in overrides.items()]}


def test_evaluate_captioner_metrics_and_the_captions_kept_for_the_report(trained, monkeypatch):
    p = trained["params"]
    scored: dict[int, str] = {}

    def spy(refs, hyps, **kwargs):
        scored.update(hyps)
        return caption_scores(refs, hyps, **kwargs)

    monkeypatch.setattr("pipeline.evaluation.caption_scores", spy)
    result = run_evaluation(p, "captioner", checkpoint_path(p, "captioner"))
    m, shown = result.metrics, result.examples
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "nltk_bleu_4"):
        assert 0.0 <= m[key] <= 10.0, key
    assert m["beam_size"] == p.evaluate.beam_size and m["images"] == p.prepare_coco.split.test
    assert m["meteor"] is None and "meteor_error" in m  # evaluate.meteor is off in TINY
    assert m["search_error_fraction"] + m["model_error_fraction"] == pytest.approx(1.0)
    for key in ("nn_bleu_4", "nn_rouge_l", "nn_cider"):  # the nearest-neighbour baseline beside the model
        assert 0.0 <= m[key] <= 10.0, key
    assert m["captions_with_unk"] == 0 and 0 <= m["captions_with_repeated_3gram"] <= m["images"]

    # the report's captions: the first report.test_images images, exactly as the scores above decoded them
    records = read_captions(Path(p.paths.coco) / "test" / "captions.jsonl")
    assert [ex.image_index for ex in shown.images] == list(range(p.report.test_images))
    for ex in shown.images:
        assert " ".join(ex.words) == scored[ex.image_index] and ex.caption == detokenize(ex.words)
        record = records[ex.image_index]
        assert (ex.image_id, ex.file_name) == (record["image_id"], record["file_name"])
        assert ex.references == [detokenize(c) for c in record["captions"]]
    assert shown.decoding == {"beam_size": p.evaluate.beam_size, "alpha": p.evaluate.alpha,
                              "no_repeat_ngram": p.evaluate.no_repeat_ngram, "rerank_neighbours": 0,
                              "ensemble_members": 1}
    assert "beam_cider" not in m and m["rerank_neighbours"] == 0 and m["ensemble_members"] == 1
    assert (shown.arch, shown.attends) == ("show_attend_tell", True)
    kept = p.report.attention_images
    assert all(ex.attention is None for ex in shown.images[kept:])  # only report.attention_images of them
    for ex in shown.images[:kept]:
        att = ex.attention
        assert att.dtype == np.float16 and att.shape[0] >= len(ex.words)  # (T, N), T = words (+1 for <end>)
        np.testing.assert_allclose(att.astype(np.float32).sum(axis=1), 1.0, atol=1e-2)  # softmax over positions


@pytest.fixture(scope="module")
def second_captioner(trained, tmp_path_factory) -> Path:
    """Another captioner like trained's, from another seed: an ensemble member."""
    models = tmp_path_factory.mktemp("second") / "models"
    other = validate_params(apply_overrides(trained["params"].to_dict(), {"seed": 7, "paths.models": str(models)}))
    return Path(train(other, "captioner", logger=False).best_checkpoint)


def test_an_ensemble_decodes_the_evaluated_captioner_with_the_listed_checkpoints(trained, second_captioner, tmp_path,
                                                                                  monkeypatch):
    p, second = trained["params"], second_captioner
    used = []

    def spy(model, *args, **kwargs):
        used.append(model)
        return decoding.beam_search(model, *args, **kwargs)

    monkeypatch.setattr("pipeline.evaluation.beam_search", spy)
    q = validate_params(apply_overrides(p.to_dict(), {"evaluate.captioner_ensemble": [str(second)]}))
    result = run_evaluation(q, "captioner", checkpoint_path(p, "captioner"))
    assert result.metrics["ensemble_members"] == 2 and result.examples.decoding["ensemble_members"] == 2
    ensemble = used[0]
    first, member = load_module("captioner", checkpoint_path(p, "captioner")), load_module("captioner", second)
    for model, expected in zip(ensemble.members, (first.model, member.model), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     expected.state_dict().values(), strict=True))
    assert not torch.equal(first.model.out.weight, member.model.out.weight)  # two different members

    ckpt = torch.load(second, map_location="cpu", weights_only=True)
    tokens = ckpt["hyper_parameters"]["vocab_tokens"]
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]  # the same words in another order: another vocabulary
    torch.save(ckpt, tmp_path / "other-vocab.ckpt")
    r = validate_params(apply_overrides(p.to_dict(), {"evaluate.captioner_ensemble": [str(tmp_path /
                                                                                         "other-vocab.ckpt")]}))
    with pytest.raises(ValueError, match="evaluate.captioner_ensemble: .*other-vocab.ckpt was trained on another voc"):
        run_evaluation(r, "captioner", checkpoint_path(p, "captioner"))
    r = validate_params(apply_overrides(p.to_dict(), {"evaluate.captioner_ensemble": [str(tmp_path / "gone.ckpt")]}))
    with pytest.raises(FileNotFoundError, match=r"gone.ckpt: no checkpoint \(listed in evaluate.captioner_ensemble\)"):
        run_evaluation(r, "captioner", checkpoint_path(p, "captioner"))


def test_reranked_captions_are_the_beam_candidates_the_nearest_training_images_agree_with(trained, monkeypatch):
    p = validate_params(apply_overrides(trained["params"].to_dict(), {"evaluate.rerank_neighbours": 3,
                                                                       "evaluate.beam_size": 4}))
    seen: dict = {}

    def spy(options, neighbours, cider, weight):
        seen.update(options=options, neighbours=neighbours, cider=cider)
        return rerank(options, neighbours, cider, weight)

    monkeypatch.setattr("pipeline.evaluation.rerank", spy)
    result = run_evaluation(p, "captioner", checkpoint_path(p, "captioner"))
    m, options = result.metrics, seen["options"]
    assert m["rerank_neighbours"] == 3 and result.examples.decoding["rerank_neighbours"] == 3
    assert set(options) == set(range(m["images"])) and all(len(n) == 3 for n in seen["neighbours"].values())
    assert all(1 <= len(o) <= 4 for o in options.values()) and any(len(o) > 1 for o in options.values())
    for ex in result.examples.images:  # the chosen caption: the candidate of highest consensus, first on ties
        best = max(options[ex.image_index], key=lambda o: consensus(o[0], seen["neighbours"][ex.image_index],
                                                                    seen["cider"]))
        assert " ".join(ex.words) == best[0]
    assert 0.0 <= m["reranked_fraction"] <= 1.0 and 0.0 <= m["beam_cider"] <= 10.0
    plain = run_evaluation(trained["params"], "captioner", checkpoint_path(p, "captioner")).metrics
    assert m["nn_cider"] == plain["nn_cider"]  # the baseline does not depend on decoding


def test_capline_caption_decodes_as_evaluation_scores_with_an_ensemble_and_reranking(trained, second_captioner,
                                                                                       caplog):
    """`capline caption --ensemble --rerank` on the test images' files writes the captions evaluate@captioner scored
    with the same settings (evaluate.captioner_ensemble, evaluate.rerank_neighbours)."""
    settings = {"evaluate.rerank_neighbours": 3, "evaluate.beam_size": 4}
    q = validate_params(apply_overrides(trained["params"].to_dict(),
                                        {**settings, "evaluate.captioner_ensemble": [str(second_captioner)]}))
    scored = run_evaluation(q, "captioner", checkpoint_path(q, "captioner")).examples.images
    assert scored[0].image_index == 0 and len(scored) == q.report.test_images
    files = [str(Path(q.data.coco.images) / ex.file_name) for ex in scored]
    sets = [arg for s in trained["set"] for arg in ("--set", s)]
    result = runner.invoke(app, ["caption", *files, "--beam", "4", "--rerank", "3", "--ensemble",
                                 str(second_captioner), *sets])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{f}: {ex.caption}" for f, ex in zip(files, scored, strict=True)]
    # the same system through params alone; and without reranking the beam's best of the ensemble
    sets_q = [arg for s in [*trained["set"], "evaluate.rerank_neighbours=3", "evaluate.beam_size=4",
                            f"evaluate.captioner_ensemble=[{json.dumps(str(second_captioner))}]"]
              for arg in ("--set", s)]
    assert runner.invoke(app, ["caption", *files, *sets_q]).stdout == result.stdout
    # the training split is only read for its images and captions: no training-time warning about max_len
    caplog.clear()
    short = runner.invoke(app, ["caption", *files, *sets_q, "--set", "models.captioner.max_len=3"])
    assert short.stdout == result.stdout and not [r for r in caplog.records if "max_len" in r.getMessage()]
    plain = run_evaluation(validate_params(apply_overrides(q.to_dict(), {"evaluate.rerank_neighbours": 0})),
                           "captioner", checkpoint_path(q, "captioner")).examples.images
    result = runner.invoke(app, ["caption", *files, "--rerank", "0", *sets_q])
    assert result.stdout.splitlines() == [f"{f}: {ex.caption}" for f, ex in zip(files, plain, strict=True)]


def test_capline_caption_names_a_missing_member_or_missing_training_images_in_one_line(trained, prepared_params,
                                                                                        tmp_path):
    image = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[0]
    sets = ["--params", str(ROOT / "params.yaml"), *[arg for s in trained["set"] for arg in ("--set", s)]]
    gone = tmp_path / "gone.ckpt"
    out = subprocess.run([sys.executable, "-m", "pipeline", "caption", str(image), "--ensemble", str(gone), *sets],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.strip() == f"capline: {gone}: no checkpoint (listed in --ensemble)", (
        out.stderr)
    empty = tmp_path / "nothing-prepared"
    out = subprocess.run([sys.executable, "-m", "pipeline", "caption", str(image), "--rerank", "2", *sets,
                          "--set", f"paths.coco={empty}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    missing = empty / "train" / "captions.jsonl"
    assert out.stderr.strip().startswith(f"capline: {missing}: no prepared training captions to rerank over"), (
        out.stderr)
    module = load_module("captioner", checkpoint_path(trained["params"], "captioner"))
    size = module.hparams["image_size"]
    module.hparams["image_size"] = 2 * size  # as if trained on images prepared at another size
    with pytest.raises(ValueError, match=f"training images are {size} px, the captioner was trained on {2 * size} px"):
        caption_neighbours(trained["params"], module, 2)


@pytest.mark.parametrize("family", ["lstm_lm", "transformer_lm"])
def test_evaluate_language_model_metrics_and_samples(trained, family):
    p = trained["params"]
    result = run_evaluation(p, family, checkpoint_path(p, family))
    m = result.metrics
    assert m == evaluate(p, family, checkpoint_path(p, family))  # the scores alone, as bench/ reads them
    assert m["level"] == "char" and m["tokens"] > 0
    assert m["perplexity"] == pytest.approx(np.exp(m["test_loss"]))
    assert m["bits_per_char"] == pytest.approx(m["test_loss"] / np.log(2))
    module = load_module(family, checkpoint_path(p, family))
    assert 0 < m["unigram_bits_per_char"] < np.log2(len(module.vocab_tokens)) + 1
    samples = result.examples  # seeded: what `capline generate` gives with these settings
    assert (samples.prompt, samples.length, samples.seed) == (p.report.prompt, p.evaluate.sample_length, p.seed)
    assert samples.samples == [(t, generate(module, p.report.prompt, p.evaluate.sample_length, t, seed=p.seed))
                               for t in p.evaluate.temperatures]


def test_caption_images_from_files(trained, prepared_params, tmp_path):
    p = trained["params"]
    module = load_module("captioner", checkpoint_path(p, "captioner"))
    images = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[:3]
    results = caption_images(module, images, beam_size=2, alpha=0.7)
    assert [r.path for r in results] == images
    assert all(isinstance(r.text, str) for r in results)
    if module.model_cfg.arch == "show_attend_tell":
        assert all(r.attention.shape[0] >= len(r.words) for r in results)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: cannot use this image"):
        caption_images(module, [bad], beam_size=2, alpha=0.7)


def test_generate_text_continues_the_prompt(trained):
    p = trained["params"]
    module = load_module("lstm_lm", checkpoint_path(p, "lstm_lm"))
    text = generate(module, "The ", length=30, temperature=0.8, seed=1)
    assert text.startswith("The ") and len(text) == 34
    assert generate(module, "The ", 30, 0.8, seed=1) == text  # seeded
    assert prompt_ids(module, "\x00") == [3]  # unknown character -> <unk>


def test_cli_evaluate_caption_generate(trained, prepared_params, tmp_path):
    sets = [arg for s in trained["set"] for arg in ("--set", s)]
    result = runner.invoke(app, ["evaluate", "lstm_lm", *sets])
    assert result.exit_code == 0, result.output
    metrics = json.loads((Path(trained["params"].paths.metrics) / "evaluate_lstm_lm.json").read_text())
    assert {"test_loss", "perplexity", "bits_per_char", "unigram_bits_per_char"} <= set(metrics)
    samples = json.loads((Path(trained["params"].paths.evaluation) / "lstm_lm" / "samples.json").read_text())
    assert [s["temperature"] for s in samples["samples"]] == trained["params"].evaluate.temperatures
    image = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[0]
    result = runner.invoke(app, ["caption", str(image), "--beam", "2", "--attention-out", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{image}: ")
    overlays = list(tmp_path.glob("*.attention.png"))
    assert len(overlays) == 1 and Image.open(overlays[0]).height > 0
    result = runner.invoke(app, ["generate", "transformer_lm", "--prompt", "def ", "--length", "10", *sets])
    assert result.exit_code == 0 and result.output.startswith("def ")

    # a bad file among good ones: the good are captioned, the bad named, exit 1
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    second = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[1]
    result = runner.invoke(app, ["caption", str(image), str(bad), str(second), "--beam", "2", *sets])
    assert result.exit_code == 1, result.output
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(image), str(second)]
    problem = "cannot use this image (not_an_image: not an image format Pillow can identify)"
    assert result.stderr.strip() == f"{bad}: {problem}"


def test_cli_train_prints_the_checkpoint(prepared_params, tmp_path):
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides_under(prepared_params, tmp_path).items()]
    result = runner.invoke(app, ["train", "transformer_lm", *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {tmp_path / 'models' / 'transformer_lm' / 'best.ckpt'}" in result.output
    assert (tmp_path / "metrics" / "train_transformer_lm.json").is_file()


def test_no_repeat_ngram_reaches_every_caption_decoder(trained, prepared_params, monkeypatch):
    """evaluate.no_repeat_ngram goes from params to beam search (evaluate, `capline caption`) and to validation."""
    seen: list[int] = []

    def spy(*args, **kwargs):
        seen.append(inspect.signature(decoding.beam_search).bind(*args, **kwargs).arguments["no_repeat_ngram"])
        return decoding.beam_search(*args, **kwargs)

    monkeypatch.setattr("pipeline.evaluation.beam_search", spy)
    monkeypatch.setattr("pipeline.inference.beam_search", spy)
    p = validate_params(apply_overrides(trained["params"].to_dict(), {"evaluate.no_repeat_ngram": 1}))
    assert evaluate(p, "captioner", checkpoint_path(p, "captioner"))["no_repeat_ngram"] == 1
    assert seen and set(seen) == {1}

    seen.clear()
    image = sorted((Path(prepared_params.paths.sample) / "images").glob("*.jpg"))[0]
    sets = [arg for s in [*trained["set"], "evaluate.no_repeat_ngram=2"] for arg in ("--set", s)]
    result = runner.invoke(app, ["caption", str(image), *sets])
    assert result.exit_code == 0, result.output
    assert seen == [2]

    # training's validation decodes greedily with it (val/cider scores captions as evaluation makes them)
    trained_with = trained["params"].evaluate.no_repeat_ngram  # params.yaml's
    assert load_module("captioner", checkpoint_path(p, "captioner")).hparams["no_repeat_ngram"] == trained_with
    vocab = vocabulary(p, "captioner")
    module = build_module(p, "captioner", vocab, build_datamodule(p, "captioner", vocab))
    assert module.hparams["no_repeat_ngram"] == 1

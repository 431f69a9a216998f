"""The side-by-side driver's plumbing (bench/anchors.py), without the references or the network.

The split both sides read, capline's streams against the reference's tokens, the parsing of the references'
logs, and capline's side on a tiny corpus for a few steps. No figure is asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.anchors import (
    CHAR,
    capline_base,
    capline_run,
    capline_word_stream,
    char_split,
    close_vocabulary,
    figures,
    parse_epoch_lines,
    parse_nanogpt,
    parse_word_reference,
    prepare_capline,
    reference_stream,
    set_args,
    split_lines,
    tables,
    threads_used,
    transformer_overrides,
    vocabularies,
)
from pipeline.params import parse_assignments

LINES = [" \n", " = Lobster = \n", " \n", " The lobster is a <unk> crustacean , 60 @-@ cm long . \n", " \n",
         " It lives in the sea . \n", " The sea is cold . \n", " A lobster eats crabs . \n",
         " Crabs are small . \n", " A crab lives in a rock pool . \n"]  # WikiText's spacing and tokens
WIKI = "".join(LINES)


def test_the_split_is_contiguous_by_lines_and_valid_test_words_unseen_in_train_become_unk() -> None:
    splits = split_lines(WIKI)
    assert splits == {"train": LINES[:8], "valid": LINES[8:9], "test": LINES[9:]}  # 80/10/10 of the lines
    closed, replaced = close_vocabulary(splits)
    assert closed["train"] == splits["train"] and replaced == {"train": 0, "valid": 3, "test": 3}
    assert closed["valid"] == [" <unk> <unk> <unk> . \n"]  # "crabs" is known, "Crabs" is not: case counts
    assert closed["test"] == [" A <unk> lives in a <unk> <unk> . \n"]
    text = "abcdefghij" * 10
    assert char_split(text) == {"train": text[:90], "val": text[90:]}  # nanoGPT's first 90% / last 10%


def test_the_reference_reads_every_line_blank_ones_too_with_eos() -> None:
    assert reference_stream([" \n", " a b \n", "c\n"]) == ["<eos>", "a", "b", "<eos>", "c", "<eos>"]


def test_capline_encodes_exactly_the_references_tokens_and_the_same_vocabulary(tmp_path: Path) -> None:
    splits, _ = close_vocabulary(split_lines(WIKI))
    prepare_capline(tmp_path, {"train": "".join(splits["train"]), "val": "".join(splits["valid"]),
                               "test": "".join(splits["test"])}, threads=1)
    for ours, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert capline_word_stream(tmp_path, ours) == reference_stream(splits[theirs])
    v = vocabularies(tmp_path, splits["train"])
    assert v["equal_but_specials"] and v["capline_only"] == ["<pad>", "<start>"] and not v["reference_only"]
    assert v["capline"] == v["reference"] + 2  # <pad> and <start>, never targets
    # capline's own route lower-cases and drops blank lines: another vocabulary and fewer tokens
    assert v["prepare_text_route"]["tokens_with_end"] < v["reference_tokens"]


def test_the_references_logs_and_capline_epoch_lines_are_parsed() -> None:
    word = ("Using device: cpu\n" + "-" * 89 + "\n"
            "| end of epoch   1 | time: 25.31s | valid loss  5.85 | valid ppl   347.12\n"
            "| end of epoch   2 | time: 24.90s | valid loss  5.60 | valid ppl   270.40\n"
            "| End of training | test loss  5.55 | test ppl   257.25\ntorch threads: 1\n")
    w = parse_word_reference(word)
    assert [e["epoch"] for e in w["epochs"]] == [1, 2] and w["epochs"][0]["seconds"] == 25.31
    assert w["test_ppl"] == 257.25 and w["best_val_ppl"] == 270.40 and threads_used(word) == 1
    nano = ("step 0: train loss 4.2874, val loss 4.2823\niter 0: loss 4.2655, time 1012.13ms, mfu -100.00%\n"
            "iter 1: loss 3.9500, time 80.00ms, mfu -100.00%\nstep 2: train loss 3.1000, val loss 3.2000\n"
            "saving checkpoint to out-shakespeare-char\niter 2: loss 3.0000, time 500.00ms, mfu 0.01%\n")
    n = parse_nanogpt(nano)
    assert n["steps"] == 2 and n["iters"] == 3 and n["val_loss"] == 3.2 and math.isclose(n["loop_seconds"], 1.59213)
    ours = parse_epoch_lines("train lstm_lm: epoch 1/2  step 250  train/loss 6.1234  val/loss 5.8000  12.3 s\n"
                             "train lstm_lm: best val/loss 5.8000 after 1 epochs; checkpoint x\n")
    assert ours == [{"epoch": 1, "step": 250, "seconds": 12.3, "train/loss": 6.1234, "val/loss": 5.8}]


def test_set_arguments_read_back_as_the_same_overrides() -> None:
    overrides = {"a": "char", "b": ["text"], "c": 1e-3, "d": False, "e": "sqlite:////tmp/x y/mlflow.db", "f": 10**7}
    assert parse_assignments(set_args(overrides)[1::2]) == overrides


@pytest.mark.parametrize("train_chars", [1_003_854, 54_000])
def test_capline_runs_nanogpts_number_of_updates(train_chars: int) -> None:
    o = transformer_overrides(CHAR, train_chars)
    batches = math.ceil(math.ceil((train_chars - 1) / CHAR["block_size"]) / CHAR["batch_size"])
    per_epoch = int(batches * o["train.transformer_lm.epoch_fraction"])  # Lightning's limit_train_batches
    assert per_epoch * o["train.transformer_lm.max_epochs"] == CHAR["max_iters"]
    assert o["train.transformer_lm.warmup_fraction"] == 100 / 2000
    assert o["train.transformer_lm.min_lr_fraction"] == pytest.approx(1e-4 / 1e-3)  # nanoGPT's min_lr / lr
    assert not any(k.endswith((".positions", ".bias")) for k in o)  # capline's own defaults


def test_capline_side_trains_the_asked_updates_in_a_child(tmp_path: Path) -> None:
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60)
    split = char_split(text)
    base = prepare_capline(tmp_path, {**split, "test": split["val"]}, threads=1)
    cfg = {**CHAR, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32, "max_iters": 8}
    overrides = {**base, **transformer_overrides(cfg, len(split["train"])), "train.log_every_n_steps": 1}
    run = capline_run("transformer_lm", overrides, tmp_path, "tiny", threads=1, evaluate=False)
    assert run["steps"] == 8 and math.isfinite(run["epochs"][-1]["val/loss"]) and run["wall_seconds"] > 0
    assert run["command"].startswith("capline train transformer_lm --set ")
    assert "--set models.transformer_lm.d_model=16" in run["command"] and "paths." not in run["command"]
    assert capline_base(tmp_path, 1)["runtime.threads"] == 1


def test_char_rows_per_seed_and_the_check_on_their_mean() -> None:
    def run(seed: int, bias: bool | None, loss: float) -> dict:
        return {"seed": seed, "bias": bias, "val_loss": loss, "steps": 2000, "loop_seconds": 1.0, "wall_seconds": 2.0}

    runs = [run(1, None, 1.90), run(1, False, 1.91), run(2, None, 1.88), run(2, False, 1.93)]
    char = {"reference": {"steps": 2000, "val_loss": 1.88, "val_loss_full": 1.895, "iter": 2000,
                          "loop_seconds": 1.0, "wall_seconds": 1.5},
            "capline": runs[0], "capline_no_bias": runs[1], "capline_runs": runs,
            "capline_mean_val_loss": 1.89, "capline_no_bias_mean_val_loss": 1.92}
    text = tables({"char": char})
    assert "| capline transformer_lm, bias false, seed 2 | 2,000 | 1.9300 |" in text
    assert "| capline transformer_lm, mean of 2 seeds | | 1.8900 |" in text
    checks = {f.name: f for f in figures({"char": char})}
    assert checks["char: capline val loss"].value == 1.89 and checks["char: capline val loss"].ok  # the mean
    assert checks["char: capline bias false val loss"].ok is False

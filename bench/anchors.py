"""Side by side with the reference implementations: same data, same size, same steps, same threads, one run.

`python -m bench.anchors --anchors DIR` (opt-in; `python -m bench anchors` runs it with DIR = .anchors/ and one
thread) runs, back to back on this machine, each side in its own child process timed from its launch, every one
with the same torch intra-op thread count (`--threads`, default 1: OMP_NUM_THREADS/MKL_NUM_THREADS in the
environment, and torch.set_num_threads for the references, runtime.threads for capline):

- word level: PyTorch's `word_language_model` (pytorch/examples, DIR/word_language_model) and capline's
  `lstm_lm` at word level, both at the reference's LSTM defaults (200-wide embedding and hidden, 2 layers,
  dropout 0.2, BPTT 35, batch 20) for the same epochs, i.e. the same optimizer updates, on one split of
  WikiText-2's valid.txt (contiguous 80/10/10 by lines; val/test words unseen in train become <unk>, WikiText's
  own closed-vocabulary rule, so both vocabularies are the training words). Reported: test perplexity.
- char level: nanoGPT's CPU recipe from its README (DIR/nanoGPT, shakespeare_char: 4 layers x 128, 4 heads,
  context 64, batch 12, 2000 iterations) and capline's `transformer_lm` at the same size, optimizer, schedule
  and steps, on the same 90%/10% character split of tiny Shakespeare, for each of `--seeds` (capline's; nanoGPT's
  is fixed), as it is and without biases. Reported: validation loss (nats/char) and wall time.

The references' code is read from DIR (extracted from the fetched repositories, git-ignored, never committed) and
run from a scratch copy, unmodified; the only change to their set-up is nanoGPT's input.txt, copied from
../shared/data/text instead of downloaded. Capline's side runs `capline train` / `capline evaluate` (python -m
pipeline) on a prepared-text folder written from the very files the reference reads, then capline's own vocab
stage: the driver checks that capline's encoded streams are token for token the reference's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, SHARED_DATA, Context, Figure, case, machine, machine_slug, now
from bench.recipes import shakespeare
from pipeline.data.text import normalise_text
from pipeline.io import write_json, write_text

WIKITEXT = SHARED_DATA / "text" / "wikitext-2" / "valid.txt"  # the only WikiText-2 file we have
SPLIT = (0.8, 0.1, 0.1)  # train / valid / test, contiguous by lines
# word_language_model's defaults (LSTM), run for `epochs` instead of its 40
WORD: dict[str, Any] = {"emsize": 200, "nhid": 200, "nlayers": 2, "dropout": 0.2, "bptt": 35, "batch_size": 20,
                        "lr": 20.0, "clip": 0.25, "epochs": 6}
# nanoGPT's README CPU command line (over config/train_shakespeare_char.py)
CHAR: dict[str, Any] = {"eval_iters": 20, "log_interval": 1, "block_size": 64, "batch_size": 12, "n_layer": 4,
                        "n_head": 4, "n_embd": 128, "max_iters": 2000, "lr_decay_iters": 2000, "dropout": 0.0}
# what nanoGPT takes from config/train_shakespeare_char.py and train.py's defaults (mirrored on capline's side)
NANOGPT_FIXED: dict[str, Any] = {"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 100, "beta1": 0.9,
                                 "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250}
# --quick: tiny sizes and a few steps, for checking the plumbing (the figures mean nothing)
WORD_QUICK = {"emsize": 16, "nhid": 16, "epochs": 1}
CHAR_QUICK = {"n_layer": 1, "n_head": 2, "n_embd": 32, "max_iters": 20, "lr_decay_iters": 20, "eval_iters": 2,
              "eval_interval": 10}
QUICK_LINES = 300  # WikiText lines used with --quick
QUICK_CHARS = 60_000  # tiny-Shakespeare characters used with --quick

# `python -c` runner of a reference script: pins torch's threads, then runs the script as __main__, unmodified
RUNNER = ("import runpy, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
          "print(f'torch threads: {torch.get_num_threads()}', file=sys.stderr, flush=True); "
          "sys.argv = sys.argv[2:]; sys.path.insert(0, '.'); runpy.run_path(sys.argv[0], run_name='__main__')")
# nanoGPT's checkpoint (written at its best evaluation: the last one here) scored on every non-overlapping window of
# val.bin, as capline's validation scores its model
NANOGPT_FULL_VAL = """
import json, numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load('out-shakespeare-char/ckpt.pt', map_location='cpu')
model = GPT(GPTConfig(**ckpt['model_args']))
model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()})
model.eval()
val = torch.from_numpy(np.fromfile('data/shakespeare_char/val.bin', dtype=np.uint16).astype(np.int64))
t = ckpt['model_args']['block_size']
n = (len(val) - 1) // t
x, y = val[: n * t].view(n, t), val[1: n * t + 1].view(n, t)
total = 0.0
with torch.no_grad():
    for s in range(0, n, 64):
        total += model(x[s: s + 64], y[s: s + 64])[1].item() * y[s: s + 64].numel()
print(json.dumps({"iter": ckpt['iter_num'], "val_loss_full": total / (n * t), "tokens": n * t}))
"""


# ---- data: one split, written for both sides ---------------------------------------------------------------


def split_lines(text: str, fractions: tuple[float, float, float] = SPLIT) -> dict[str, list[str]]:
    """Contiguous train/valid/test blocks of whole lines (newlines kept), sized by `fractions` of the lines."""
    lines = text.splitlines(keepends=True)
    n_train, n_valid = round(len(lines) * fractions[0]), round(len(lines) * fractions[1])
    return {"train": lines[:n_train], "valid": lines[n_train:n_train + n_valid], "test": lines[n_train + n_valid:]}


def close_vocabulary(splits: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """valid/test words never seen in train become <unk> (WikiText's closed vocabulary); counts per split.

    The reference builds its dictionary over all three files, so an unseen word would get an untrained row of
    its own there and be <unk> in capline: closing the vocabulary first gives both sides the same vocabulary.
    """
    known = {w for line in splits["train"] for w in line.split()}
    out, replaced = {"train": splits["train"]}, {"train": 0}
    for split in ("valid", "test"):
        lines, count = [], 0
        for line in splits[split]:
            words = line.split()
            closed = [w if w in known else "<unk>" for w in words]
            count += sum(a != b for a, b in zip(words, closed, strict=True))
            lines.append(line if closed == words else " " + " ".join(closed) + " \n")  # WikiText's spacing
        out[split], replaced[split] = lines, count
    return out, replaced


def reference_stream(lines: list[str]) -> list[str]:
    """The tokens word_language_model's data.py reads from these lines: whitespace words, <eos> after each line."""
    return [w for line in lines for w in line.split() + ["<eos>"]]


def char_split(text: str) -> dict[str, str]:
    """nanoGPT's shakespeare_char split: the first 90% of the characters train, the rest val."""
    n = int(len(text) * 0.9)
    return {"train": text[:n], "val": text[n:]}


# ---- capline's side ------------------------------------------------------------------------------------------

PATH_KEYS = ("sample", "coco", "text", "vocab", "encoded", "embeddings", "features", "models", "sweeps",
             "ray_storage", "metrics", "reports")


def capline_base(root: Path, threads: int) -> dict[str, Any]:
    """Overrides shared by every capline run here: paths under `root`, one vocabulary of every training word."""
    return {**{f"paths.{k}": str(root / k) for k in PATH_KEYS}, "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
            "runtime.threads": threads, "train.accelerator": "cpu", "vocab.sources": ["text"], "vocab.min_freq": 1,
            "vocab.max_size": 10_000_000, "vocab.char_min_freq": 1}


def prepare_capline(root: Path, texts: dict[str, str], threads: int) -> dict[str, Any]:
    """Write capline's prepared-text folder from the reference's files (split -> text), run the vocab stage.

    `<split>.words.txt` holds each line's whitespace words, a blank line for a blank line (its <end> is the
    reference's <eos> of that line): the word stream is then exactly the reference's. Returns the base overrides.
    """
    import contextlib
    import io

    from pipeline.params import load_params
    from stages import vocab

    base = capline_base(root, threads)
    text_dir = root / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (text_dir / f"{split}.txt").write_text(text, encoding="utf-8")
        words = "".join(" ".join(line.split()) + "\n" for line in text.splitlines())
        (text_dir / f"{split}.words.txt").write_text(words, encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        vocab.run(load_params(ROOT / "params.yaml", base))
    return base


def capline_word_stream(root: Path, split: str) -> list[str]:
    """capline's encoded word stream of a split as tokens, <end> written as the reference's <eos>."""
    import numpy as np

    from pipeline.data.vocab import Vocabulary
    from pipeline.tokens import END

    tokens = Vocabulary.load(root / "vocab" / "words.json").tokens
    ids = np.load(root / "encoded" / f"text_{split}_word.npy")
    return ["<eos>" if tokens[i] == END else tokens[i] for i in ids.tolist()]


def vocabularies(root: Path, train_lines: list[str]) -> dict[str, Any]:
    """The two word vocabularies (the reference's: every training word and <eos>) and how they differ; and what
    capline's own prepare_text route (NLTK words, lower-cased, blank lines dropped, min_freq 3, max 10,000) gives."""
    from pipeline.data.text import word_lines
    from pipeline.data.vocab import Vocabulary
    from pipeline.tokens import END, SPECIALS, UNK

    ref = set(reference_stream(train_lines))
    ours = set(Vocabulary.load(root / "vocab" / "words.json").tokens)
    # capline's <end> is the reference's <eos>, its <unk> WikiText's; <pad> and <start> are never targets
    as_ref = (ours - set(SPECIALS)) | {"<eos>"} | ({UNK} & ref)
    text = "".join(train_lines)
    own = [t for line in word_lines(text, lowercase=True) for t in line]
    cased = [t for line in word_lines(text, lowercase=False) for t in line]
    own_vocab = Vocabulary.build(Counter(own), 3, 10_000)
    return {"reference": len(ref), "capline": len(ours), "equal_but_specials": as_ref == ref,
            "capline_only": sorted(ours - as_ref - {END}), "reference_only": sorted(ref - as_ref),
            "reference_tokens": len(reference_stream(train_lines)),
            "prepare_text_route": {"tokens_with_end": len(own) + sum(1 for ln in text.splitlines() if ln.strip()),
                                   "types_cased": len(set(cased)), "types_lowercased": len(set(own)),
                                   "vocab_min_freq_3_max_10000": len(own_vocab)}}


def yaml_value(v: Any) -> str:
    """A value as `--set` reads it back (YAML): plain words and numbers bare, lists in brackets, else JSON."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.-]*", v) and v.lower() not in ("true", "false", "null"):
        return v
    return json.dumps(v)


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`--set key=value` arguments."""
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={yaml_value(v)}")]


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+step (\d+)\s+(.*?)\s+([\d.]+) s$")


def parse_epoch_lines(log: str) -> list[dict[str, float]]:
    """capline's one line per epoch (EpochLine): epoch, step, train/loss, val/loss, seconds (training + validation)."""
    rows = []
    for line in log.splitlines():
        m = EPOCH_LINE.search(line.strip())
        if m:
            values = dict(zip(*[iter(m.group(4).split())] * 2, strict=True))
            rows.append({"epoch": int(m.group(1)), "step": int(m.group(3)), "seconds": float(m.group(5)),
                         **{k: float(v) for k, v in values.items()}})
    return rows


# ---- the references' logs -------------------------------------------------------------------------------------

WORD_EPOCH = re.compile(r"end of epoch\s+(\d+) \| time:\s*([\d.]+)s \| valid loss\s+([\d.]+) \| valid ppl\s+([\d.]+)")
WORD_TEST = re.compile(r"End of training \| test loss\s+([\d.]+) \| test ppl\s+([\d.]+)")
NANO_EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
NANO_ITER = re.compile(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def parse_word_reference(log: str) -> dict[str, Any]:
    """word_language_model's epochs (seconds, valid ppl) and final test perplexity (of its best-val model)."""
    epochs = [{"epoch": int(e), "seconds": float(s), "val_ppl": float(p)} for e, s, _, p in WORD_EPOCH.findall(log)]
    test = WORD_TEST.search(log)
    return {"epochs": epochs, "test_ppl": float(test.group(2)) if test else None,
            "best_val_ppl": min((e["val_ppl"] for e in epochs), default=None)}


def parse_nanogpt(log: str) -> dict[str, Any]:
    """nanoGPT's evaluations (step, train, val loss), iterations run and their summed time (the loop's seconds)."""
    evals = [{"step": int(s), "train_loss": float(t), "val_loss": float(v)} for s, t, v in NANO_EVAL.findall(log)]
    iters = NANO_ITER.findall(log)
    return {"evals": evals, "iters": len(iters), "loop_seconds": sum(float(ms) for *_, ms in iters) / 1000,
            "steps": evals[-1]["step"] if evals else 0,  # updates before its last evaluation (one more follows it)
            "val_loss": evals[-1]["val_loss"] if evals else None}


def threads_used(log: str) -> int | None:
    """The thread count a reference ran with, as RUNNER printed it."""
    m = re.search(r"torch threads: (\d+)", log)
    return int(m.group(1)) if m else None


# ---- children ------------------------------------------------------------------------------------------------


def run_child(args: list[str], cwd: Path, threads: int, log: Path, timeout: float = 3600) -> tuple[float, str]:
    """Run a command with `threads` OpenMP/MKL threads; (wall seconds from launch, stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    out = done.stdout + done.stderr
    write_text(log, out)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:6])} ... exited {done.returncode} (log: {log}): {out[-2000:]}")
    return wall, out


def _copy_reference(src: Path, dest: Path, files: tuple[str, ...]) -> Path:
    if not all((src / f).exists() for f in files):
        raise FileNotFoundError(f"{src}: expected {', '.join(files)} (extract the reference there: see BENCHMARKS.md)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        (shutil.copytree if (src / f).is_dir() else shutil.copy2)(src / f, dest / f)
    return dest


def capline_run(family: str, overrides: dict[str, Any], root: Path, label: str, threads: int,
                evaluate: bool) -> dict[str, Any]:
    """`capline train FAMILY --set ...` (and `capline evaluate` on its best checkpoint) in a child process."""
    own = {"paths.models": str(root / f"models-{label}"), "paths.metrics": str(root / f"metrics-{label}")}
    sets = ["--params", str(ROOT / "params.yaml"), *set_args({**overrides, **own})]
    load = os.getloadavg()[0]
    wall, out = run_child([sys.executable, "-m", "pipeline", "train", family, *sets], root, threads,
                          root / f"{label}.train.log")
    epochs = parse_epoch_lines(out)
    record: dict[str, Any] = {"label": label, "wall_seconds": wall, "loop_seconds": sum(e["seconds"] for e in epochs),
                              "epochs": epochs, "steps": epochs[-1]["step"] if epochs else 0, "load_before": load,
                              "command": shlex.join(["capline", "train", family, *_shown(sets)])}
    if evaluate:
        run_child([sys.executable, "-m", "pipeline", "evaluate", family, *sets], root, threads,
                  root / f"{label}.evaluate.log")
        record["test"] = json.loads((root / f"metrics-{label}" / f"evaluate_{family}.json").read_text())
    record["load_after"] = os.getloadavg()[0]
    return record


def _shown(sets: list[str]) -> list[str]:
    """The --set arguments that are not scratch paths or tracking (what a reader needs to rerun the recipe)."""
    keep = [v for k, v in zip(sets[::2], sets[1::2], strict=True)
            if k == "--set" and not v.startswith(("paths.", "tracking."))]
    return [a for v in keep for a in ("--set", v)]


# ---- word level ----------------------------------------------------------------------------------------------


def word_level(anchors: Path, scratch: Path, threads: int, quick: bool, epochs: int | None = None) -> dict[str, Any]:
    """word_language_model and capline's lstm_lm (three budgets) on the same WikiText-2 split; test perplexities."""
    cfg = {**WORD, **(WORD_QUICK if quick else {}), **({"epochs": epochs} if epochs else {})}
    text = WIKITEXT.read_text(encoding="utf-8")
    if quick:
        text = "".join(text.splitlines(keepends=True)[:QUICK_LINES])
    splits, replaced = close_vocabulary(split_lines(text))
    ref_dir = _copy_reference(anchors / "word_language_model", scratch / "word_language_model",
                              ("main.py", "model.py", "data.py"))
    data_dir = ref_dir / "wikitext-2"
    data_dir.mkdir()
    for split, lines in splits.items():
        (data_dir / f"{split}.txt").write_text("".join(lines), encoding="utf-8")

    root = scratch / "capline-word"
    base = prepare_capline(root, {"train": "".join(splits["train"]), "val": "".join(splits["valid"]),
                                  "test": "".join(splits["test"])}, threads)
    for split, ours in (("train", "train"), ("valid", "val"), ("test", "test")):
        if capline_word_stream(root, ours) != reference_stream(splits[split]):
            raise RuntimeError(f"capline's {ours} word stream differs from the reference's {split}.txt tokens")
    rows = len(reference_stream(splits["train"])) // cfg["batch_size"]
    steps_per_epoch = math.ceil((rows - 1) / cfg["bptt"])

    args = [f"--{k}={v}" for k, v in cfg.items()] + ["--data=wikitext-2", "--save=model.pt"]
    load = os.getloadavg()[0]
    wall, out = run_child([sys.executable, "-c", RUNNER, str(threads), "main.py", *args], ref_dir, threads,
                          scratch / "word_language_model.log")
    reference = {"label": "reference", "wall_seconds": wall, "load_before": load, "load_after": os.getloadavg()[0],
                 "steps": steps_per_epoch * cfg["epochs"], "command": "python main.py " + " ".join(args),
                 "threads": threads_used(out),
                 **parse_word_reference(out)}
    reference["loop_seconds"] = sum(e["seconds"] for e in reference["epochs"])

    model = {"models.lstm_lm.level": "word", "models.lstm_lm.cell": "lstm", "models.lstm_lm.embed_size": cfg["emsize"],
             "models.lstm_lm.hidden_size": cfg["nhid"], "models.lstm_lm.layers": cfg["nlayers"],
             "models.lstm_lm.dropout": cfg["dropout"], "models.lstm_lm.tie_weights": False}
    same = {"train.lstm_lm.batch_size": cfg["batch_size"], "train.lstm_lm.bptt": cfg["bptt"],
            "train.lstm_lm.max_epochs": cfg["epochs"], "train.lstm_lm.epoch_fraction": 1.0,
            "train.lstm_lm.early_stopping_patience": 0}
    # the reference's plain SGD as closely as params allow: lr <= 10 there (it uses 20, quartered on plateaus)
    sgd = {"train.lstm_lm.optimizer": "sgd", "train.lstm_lm.lr": 10.0, "train.lstm_lm.momentum": 0.0,
           "train.lstm_lm.weight_decay": 0.0, "train.lstm_lm.schedule": "constant",
           "train.lstm_lm.warmup_fraction": 0.0, "train.lstm_lm.clip_grad_norm": cfg["clip"]}
    runs = [capline_run("lstm_lm", {**base, **model, **same}, root, "same-steps-adam", threads, True),
            capline_run("lstm_lm", {**base, **model, **same, **sgd}, root, "same-steps-sgd", threads, True),
            capline_run("lstm_lm", {**base, **model}, root, "default-budget", threads, True)]
    for r in runs:
        r["test_ppl"] = r["test"]["perplexity"]
        r["best_val_ppl"] = min((math.exp(e["val/loss"]) for e in r["epochs"] if "val/loss" in e), default=None)
    return {"config": cfg, "steps_per_epoch": steps_per_epoch, "replaced_by_unk": replaced,
            "vocabulary": vocabularies(root, splits["train"]), "reference": reference, "capline": runs}


# ---- char level ----------------------------------------------------------------------------------------------


def transformer_overrides(cfg: dict[str, Any], train_chars: int) -> dict[str, Any]:
    """capline's transformer_lm at nanoGPT's size, optimizer, schedule and number of updates.

    capline counts epochs of non-overlapping context windows: the run is the fewest epochs that share the
    updates evenly, each cut to that many batches by epoch_fraction. The cosine decays to nanoGPT's min_lr
    (min_lr_fraction = min_lr / lr); the warm-up is nanoGPT's warmup_iters as a fraction of the updates. The rest
    of the model (learned positions, biases) and which weights decay are capline's defaults.
    """
    steps, t, batch = cfg["max_iters"], cfg["block_size"], cfg["batch_size"]
    batches = math.ceil(math.ceil((train_chars - 1) / t) / batch)  # TokenWindows, then batches of `batch`
    epochs = next(e for e in range(1, steps + 1) if steps % e == 0 and steps // e <= batches)
    fraction = min(1.0, (steps // epochs + 0.5) / batches)  # Lightning runs int(batches * fraction) batches
    model, train = "models.transformer_lm.", "train.transformer_lm."
    return {model + "level": "char", model + "d_model": cfg["n_embd"], model + "layers": cfg["n_layer"],
            model + "heads": cfg["n_head"], model + "ff_size": 4 * cfg["n_embd"], model + "dropout": cfg["dropout"],
            model + "context": t, train + "optimizer": "adamw", train + "lr": NANOGPT_FIXED["learning_rate"],
            train + "weight_decay": NANOGPT_FIXED["weight_decay"], train + "beta1": NANOGPT_FIXED["beta1"],
            train + "beta2": NANOGPT_FIXED["beta2"], train + "schedule": "cosine",
            train + "warmup_fraction": min(0.5, NANOGPT_FIXED["warmup_iters"] / steps), train + "max_epochs": epochs,
            train + "epoch_fraction": round(fraction, 6), train + "batch_size": batch,
            train + "clip_grad_norm": NANOGPT_FIXED["grad_clip"], train + "early_stopping_patience": 0,
            train + "label_smoothing": 0.0,
            train + "min_lr_fraction": NANOGPT_FIXED["min_lr"] / NANOGPT_FIXED["learning_rate"]}


def char_level(anchors: Path, scratch: Path, threads: int, quick: bool,
               seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """nanoGPT's shakespeare_char CPU recipe and capline's transformer_lm at the same size and steps.

    capline runs once per seed (default: params.yaml's), as it is and with bias false (nanoGPT's recipe has no
    biases: the same parameter count exactly). nanoGPT's seed is fixed in its train.py (1337).
    """
    source = shakespeare()
    if source is None:
        raise FileNotFoundError("tinyshakespeare.txt not in ../shared/data/text or data/text")
    text = source.read_text(encoding="utf-8")
    cfg = {**CHAR, **({k: v for k, v in CHAR_QUICK.items() if k in CHAR} if quick else {})}
    extra = {"eval_interval": CHAR_QUICK["eval_interval"]} if quick else {}
    ref_dir = _copy_reference(anchors / "nanoGPT", scratch / "nanoGPT",
                              ("train.py", "model.py", "configurator.py", "config", "data/shakespeare_char"))
    prepared = ref_dir / "data" / "shakespeare_char"
    (prepared / "input.txt").write_text(text[:QUICK_CHARS] if quick else text, encoding="utf-8")  # no download
    run_child([sys.executable, "data/shakespeare_char/prepare.py"], ref_dir, threads, scratch / "nanogpt.prepare.log")
    args = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            *[f"--{k}={v}" for k, v in {**cfg, **extra}.items()]]
    load = os.getloadavg()[0]
    wall, out = run_child([sys.executable, "-c", RUNNER, str(threads), "train.py", *args], ref_dir, threads,
                          scratch / "nanogpt.train.log")
    reference = {"label": "nanoGPT", "wall_seconds": wall, "load_before": load, "load_after": os.getloadavg()[0],
                 "command": "python train.py " + " ".join(args), "threads": threads_used(out),
                 **parse_nanogpt(out)}
    if (ref_dir / "out-shakespeare-char" / "ckpt.pt").is_file():  # saved at its best evaluation (none: never better)
        _, full = run_child([sys.executable, "-c", NANOGPT_FULL_VAL], ref_dir, threads, scratch / "nanogpt.val.log")
        reference.update(json.loads(full.strip().splitlines()[-1]))

    split = char_split(text[:QUICK_CHARS] if quick else text)
    root = scratch / "capline-char"
    base = prepare_capline(root, {**split, "test": split["val"]}, threads)  # capline wants a test split: val again
    overrides = {**base, **transformer_overrides(cfg, len(split["train"]))}
    runs = []
    for seed in seeds or (None,):  # None: params.yaml's seed
        for bias in (None, False):  # None: params.yaml's models.transformer_lm.bias
            sets = {**overrides, **({} if seed is None else {"seed": seed}),
                    **({} if bias is None else {"models.transformer_lm.bias": bias})}
            label = "capline" + ("" if bias is None else "-no-bias") + ("" if seed is None else f"-seed{seed}")
            run = capline_run("transformer_lm", sets, root, label, threads, False)
            run.update(seed=seed, bias=bias, val_loss=run["epochs"][-1].get("val/loss") if run["epochs"] else None)
            runs.append(run)
    default, no_bias = ([r for r in runs if r["bias"] is b] for b in (None, False))
    return {"config": {**cfg, **NANOGPT_FIXED, **extra}, "train_chars": len(split["train"]),
            "val_chars": len(split["val"]), "text_is_normalised": normalise_text(text) == text,
            "reference": reference, "capline": default[0], "capline_no_bias": no_bias[0], "capline_runs": runs,
            "capline_mean_val_loss": _mean(r["val_loss"] for r in default),
            "capline_no_bias_mean_val_loss": _mean(r["val_loss"] for r in no_bias)}


def _mean(values: Any) -> float | None:
    values = list(values)
    return None if not values or None in values else sum(values) / len(values)


# ---- report --------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def tables(result: dict[str, Any]) -> str:
    """The two side-by-side tables as Markdown."""
    lines = []
    if "word" in result:
        w = result["word"]
        lines += ["| word level (WikiText-2 split) | optimizer updates | best val ppl | test ppl | training s "
                  "| process wall s |", "|---|---|---|---|---|---|"]
        ref = w["reference"]
        lines.append(f"| word_language_model (SGD lr {w['config']['lr']:g}, /4 on plateau, clip {w['config']['clip']}) "
                     f"| {ref['steps']:,} | {_f(ref['best_val_ppl'])} | {_f(ref['test_ppl'])} "
                     f"| {_f(ref['loop_seconds'])} | {_f(ref['wall_seconds'])} |")
        names = {"same-steps-adam": "capline lstm_lm, same batches, train.lstm_lm's Adam 3e-3 cosine",
                 "same-steps-sgd": "capline lstm_lm, same batches, SGD lr 10 constant, clip 0.25",
                 "default-budget": "capline lstm_lm, default budget (train.lstm_lm: batch 32, BPTT 128, 2 epochs)"}
        for r in w["capline"]:
            lines.append(f"| {names.get(r['label'], r['label'])} | {r['steps']:,} | {_f(r['best_val_ppl'])} "
                         f"| {_f(r['test_ppl'])} | {_f(r['loop_seconds'])} | {_f(r['wall_seconds'])} |")
    if "char" in result:
        c = result["char"]
        ref, ours = c["reference"], c["capline"]
        lines += ["", "| char level (tiny Shakespeare, 90/10) | optimizer updates | val loss, own estimate "
                  "| val loss, every val window | training s | process wall s |", "|---|---|---|---|---|---|"]
        lines.append(f"| nanoGPT | {ref['steps']:,} | {_f(ref['val_loss'], 4)} (20 random batches) "
                     f"| {_f(ref.get('val_loss_full'), 4)} (checkpoint of step {ref.get('iter')}) "
                     f"| {_f(ref['loop_seconds'])} | {_f(ref['wall_seconds'])} |")
        for r in c.get("capline_runs", [ours]):
            name = "capline transformer_lm" + (", bias false" if r.get("bias") is False else "") + (
                f", seed {r['seed']}" if r.get("seed") is not None else "")
            lines.append(f"| {name} | {r['steps']:,} | {_f(r['val_loss'], 4)} "
                         f"| {_f(r['val_loss'], 4)} | {_f(r['loop_seconds'])} | {_f(r['wall_seconds'])} |")
        seeds = {r.get("seed") for r in c.get("capline_runs", [])}
        if len(seeds) > 1:
            for name, key in (("", "capline_mean_val_loss"), (", bias false", "capline_no_bias_mean_val_loss")):
                lines.append(f"| capline transformer_lm{name}, mean of {len(seeds)} seeds | | "
                             f"{_f(c[key], 4)} | {_f(c[key], 4)} | | |")
    return "\n".join(lines) + "\n"


def side_by_side(anchors: Path, threads: int = 1, quick: bool = False, levels: tuple[str, ...] = ("word", "char"),
                 scratch: Path | None = None, word_epochs: int | None = None,
                 seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Both comparisons, back to back; the machine and its load average before and after."""
    scratch = scratch or Path(tempfile.mkdtemp(prefix="capline-anchors-"))
    result: dict[str, Any] = {"date": now(), "threads": threads, "quick": quick, "anchors": str(anchors),
                              "machine": machine(), "scratch": str(scratch)}
    if "word" in levels:
        result["word"] = word_level(anchors, scratch, threads, quick, word_epochs)
    if "char" in levels:
        result["char"] = char_level(anchors, scratch, threads, quick, seeds)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def figures(result: dict[str, Any]) -> list[Figure]:
    """The comparison as bench figures: capline's test perplexities, val loss and wall against the reference's."""
    out: list[Figure] = []
    if "word" in result:
        w = result["word"]
        ref = w["reference"]["test_ppl"]
        out.append(Figure("word: word_language_model test perplexity", ref, "ppl",
                          note=f"{w['reference']['steps']} updates"))
        for r in w["capline"]:
            out.append(Figure.check(f"word: capline {r['label']} test perplexity", r["test_ppl"], "ppl", "<=",
                                    ref or math.inf, note=f"{r['steps']} updates"))
    if "char" in result:
        c = result["char"]
        ref, ours = c["reference"], c["capline"]
        seeds = len({r.get("seed") for r in c.get("capline_runs", [ours])})
        out += [Figure("char: nanoGPT val loss (every val window)", ref.get("val_loss_full"), "nats",
                       note=f"own 20-batch estimate {ref['val_loss']}"),
                Figure.check("char: capline val loss", c.get("capline_mean_val_loss", ours["val_loss"]), "nats", "<=",
                             ref.get("val_loss_full") or math.inf, note=f"mean of {seeds} seeds" if seeds > 1 else ""),
                Figure("char: nanoGPT wall from launch", ref["wall_seconds"], "s"),
                Figure.check("char: capline wall from launch", ours["wall_seconds"], "s", "<=", ref["wall_seconds"])]
        if "capline_no_bias" in c:
            out.append(Figure.check("char: capline bias false val loss",
                                    c.get("capline_no_bias_mean_val_loss", c["capline_no_bias"]["val_loss"]), "nats",
                                    "<=", ref.get("val_loss_full") or math.inf))
    return out


@case("anchors", default=False)
def anchors_case(ctx: Context) -> list[Figure]:
    """Side by side with word_language_model and nanoGPT (from .anchors/): same data, size, steps, 1 thread."""
    result = side_by_side(ROOT / ".anchors", threads=1, quick=ctx.quick, scratch=ctx.scratch / "anchors")
    return figures(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anchors", description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=Path, default=ROOT / ".anchors",
                        help="folder holding word_language_model/ and nanoGPT/ (default .anchors)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every side (default 1)")
    parser.add_argument("--only", choices=("word", "char"), help="run one comparison only")
    parser.add_argument("--word-epochs", type=int, default=None, help=f"epochs of both word runs ({WORD['epochs']})")
    parser.add_argument("--seeds", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                        help="char level: capline's seeds, comma-separated (default: params.yaml's seed); the check "
                             "uses their mean val loss (nanoGPT's seed is fixed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and data: checks the plumbing only")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/anchors; --quick: bench/results/quick/anchors)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (logs, data)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    scratch = Path(tempfile.mkdtemp(prefix="capline-anchors-"))
    try:
        result = side_by_side(args.anchors.resolve(), args.threads, args.quick,
                              (args.only,) if args.only else ("word", "char"), scratch, args.word_epochs, args.seeds)
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    out = args.out or (RESULTS_DIR / "quick" / "anchors" if args.quick else RESULTS_DIR / "anchors")
    path = out / f"{machine_slug(result['machine'])}.json"
    write_json(path, result)
    write_text(path.with_suffix(".md"), tables(result))
    print(tables(result))
    print(f"results: {path} (+ .md); load average 1 min: {result['machine']['load_average_1m']} at start, "
          f"{result['load_average_1m_after']} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

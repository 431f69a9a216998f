"""params.yaml loading: every default validates; bad keys, types and ranges are named."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, apply_overrides, load_params, parse_assignments
from tests.conftest import ROOT


def test_real_params_yaml_validates():
    p = load_params(ROOT / "params.yaml")
    assert p.vocab.min_freq >= 1
    assert p.data.coco.annotations.startswith(p.paths.sample)


def test_override_changes_only_that_key():
    p = load_params(ROOT / "params.yaml", {"vocab.min_freq": 7, "prepare_coco.split.val": 3})
    base = load_params(ROOT / "params.yaml")
    assert (p.vocab.min_freq, p.prepare_coco.split.val) == (7, 3)
    assert p.vocab.max_size == base.vocab.max_size


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        ({"vocab.min_freq": 0}, "vocab.min_freq", "greater than or equal to 1"),
        ({"vocab.min_freq": "3"}, "vocab.min_freq", "valid integer"),
        ({"embeddings.pretrained": "word2vec"}, "embeddings.pretrained", "glove-6b-50d"),
        ({"vocab.sources": []}, "vocab.sources", "at least 1"),
        ({"prepare_text.split.val": 0.7}, "prepare_text.split.val", "less than 0.5"),
        ({"embeddings.pretrained": "glove-6b-50d", "embeddings.dim": 8}, "embeddings", "dim must be 50"),
        ({"train.bucket_by_length": True, "train.group_by_image": True}, "train",
         "bucket_by_length and group_by_image"),
    ],
)
def test_bad_values_name_the_key(overrides, key, expected):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", overrides)
    assert f"{key}:" in str(err.value) and expected in str(err.value)


def test_unknown_key_in_file_is_rejected(tmp_path: Path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["vocab"]["min_frequency"] = 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"vocab.min_frequency: unknown key"):
        load_params(path)


def test_missing_key_in_file_is_rejected(tmp_path: Path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["embeddings"]["window"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"embeddings.window: missing key"):
        load_params(path)


def test_unknown_override_key_is_rejected():
    with pytest.raises(ParamsError, match="vocab.min_freqq: unknown key"):
        load_params(ROOT / "params.yaml", {"vocab.min_freqq": 2})
    with pytest.raises(ParamsError, match="no section 'vocabulary'"):
        load_params(ROOT / "params.yaml", {"vocabulary.min_freq": 2})


def test_overridden_params_are_a_validated_copy():
    base = load_params(ROOT / "params.yaml")
    p = base.overridden({"vocab.min_freq": 7}, source="sweep.captioner trial")
    assert (p.vocab.min_freq, base.vocab.min_freq) == (7, load_params(ROOT / "params.yaml").vocab.min_freq)
    assert p.overridden(["vocab.min_freq=2"]).vocab.min_freq == 2  # key=value strings too
    with pytest.raises(ParamsError, match=r"^sweep.captioner trial: override vocab.min_freqq: unknown key"):
        base.overridden({"vocab.min_freqq": 2}, source="sweep.captioner trial")
    with pytest.raises(ParamsError, match=r"^invalid params: bench: vocab.min_freq: .*greater than or equal to 1"):
        base.overridden({"vocab.min_freq": 0}, source="bench")


def test_assignments_parse_yaml_values():
    assert parse_assignments(["a.b=3", "c=[x, y]", "d=null", "e=1.5e-3", "f=3e-3", "g=1e"]) == {
        "a.b": 3, "c": ["x", "y"], "d": None, "e": 1.5e-3, "f": 3e-3, "g": "1e"}
    with pytest.raises(ParamsError, match="expected key=value"):
        parse_assignments(["novalue"])


def test_overrides_do_not_mutate_input():
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, {"a.b": 2}) == {"a": {"b": 2}}
    assert raw == {"a": {"b": 1}}


def test_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(scalar)


def test_val_files_must_come_in_pairs():
    with pytest.raises(ParamsError, match="data.coco: .*given together"):
        load_params(ROOT / "params.yaml", {"data.coco.val_annotations": "x.json"})


@pytest.mark.parametrize(("space", "message"), [
    ({}, "sweep.lstm_lm.space: Dictionary should have at least 1 item"),
    ({"train.lstm_lm.lrr": {"loguniform": [1.0e-3, 1.0e-2]}}, "space.train.lstm_lm.lrr: no such params key"),
    ({"models.captioner.arch": {"choice": ["show_tell"]}}, "a lstm_lm sweep may only vary"),
    ({"train.lstm_lm.lr": {"loguniform": [0, 1.0e-2]}}, "loguniform needs low > 0"),
    ({"train.lstm_lm.lr": {"loguniform": [1.0e-2, 1.0e-3]}}, "needs low < high"),
    ({"train.lstm_lm.beta1": {"one_minus_loguniform": [0.1, 1.5]}}, "high must be < 1"),
    ({"train.lstm_lm.lr": {"normal": [0, 1]}}, "expected one of {loguniform"),
    ({"models.lstm_lm.layers": {"randint": [1.5, 3]}}, "randint needs integer bounds"),
    ({"models.lstm_lm.cell": {"choice": []}}, "choice needs a non-empty list"),
])
def test_bad_search_spaces_are_rejected_naming_the_key(space, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(ROOT / "params.yaml", {"sweep.lstm_lm.space": space})


@pytest.mark.parametrize(("space", "message"), [
    ({"train.lstm_lm.lr": {"uniform": [-1, -0.5]}},
     "sweep.lstm_lm.space.train.lstm_lm.lr: uniform [-1, -0.5] can give -1.0, which train.lstm_lm.lr does not "
     "accept: Input should be greater than 0"),
    ({"train.lstm_lm.lr": {"loguniform": [1.0e-3, 20.0]}}, "can give 20.0, which train.lstm_lm.lr does not accept"),
    ({"models.lstm_lm.cell": {"choice": ["lstm", "transformer"]}},
     "can give 'transformer', which models.lstm_lm.cell does not accept: Input should be 'lstm' or 'gru'"),
    ({"models.lstm_lm.layers": {"randint": [0, 3]}}, "can give 0, which models.lstm_lm.layers does not accept"),
    ({"models.lstm_lm.layers": {"uniform": [1, 3]}}, "Input should be a valid integer; use randint or choice"),
    ({"models.lstm_lm.layers": {"one_minus_loguniform": [1.0e-3, 0.5]}}, "can give 0.5, which models.lstm_lm.layers"),
    ({"models.lstm_lm.dropout": {"uniform": [0.0, 1.0]}}, "can give 1.0, which models.lstm_lm.dropout"),
    ({"seed": {"randint": [0, 2**33]}}, f"can give {2**33 - 1}, which seed does not accept"),
])
def test_search_space_values_must_be_valid_for_the_field_they_tune(space, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(ROOT / "params.yaml", {"sweep.lstm_lm.space": space})


def test_search_space_values_inside_the_fields_range_are_accepted():
    space = {"models.lstm_lm.layers": {"randint": [1, 3]}, "models.lstm_lm.dropout": {"uniform": [0.0, 0.5]},
             "train.lstm_lm.beta2": {"one_minus_loguniform": [1.0e-3, 1.0e-1]}, "seed": {"randint": [0, 2**32]},
             "train.lstm_lm.lr": {"choice": [1.0e-3, 1]}}  # an int is a valid float
    assert load_params(ROOT / "params.yaml", {"sweep.lstm_lm.space": space}).sweep.lstm_lm.space == space


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2**32 - 1, True), (2**32, False), (-1, False)])
def test_seed_is_a_32_bit_unsigned_integer(seed, ok):
    if ok:
        assert load_params(ROOT / "params.yaml", {"seed": seed}).seed == seed
    else:
        with pytest.raises(ParamsError, match=r"^invalid params: \S*params.yaml: seed: Input should be"):
            load_params(ROOT / "params.yaml", {"seed": seed})


def test_params_nested_too_deeply_name_the_file_or_the_override(tmp_path: Path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(deep))}: nested too deeply to read"):
        load_params(deep)
    with pytest.raises(ParamsError, match=r"^--set seed: value nested too deeply to read"):
        parse_assignments(["seed=" + "{a: " * 20_000 + "1" + "}" * 20_000])


def test_one_problem_is_one_line_and_several_are_one_line_each():
    with pytest.raises(ParamsError) as one:
        load_params(ROOT / "params.yaml", {"vocab.min_freq": 0})
    assert "\n" not in str(one.value)
    with pytest.raises(ParamsError) as two:
        load_params(ROOT / "params.yaml", {"vocab.min_freq": 0, "seed": -1})
    assert str(two.value).splitlines()[0] == "invalid params:" and len(str(two.value).splitlines()) == 3

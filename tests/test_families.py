"""The family registry is the one list of model families: params, dvc.yaml, the CLI and training agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.families import FAMILIES, LANGUAGE_MODELS, family
from pipeline.params import ModelsParams, SweepParams, TrainParams
from tests.conftest import ROOT


def test_params_sections_are_the_registered_families():
    for schema in (ModelsParams, TrainParams, SweepParams):
        assert set(FAMILIES) <= set(schema.model_fields), schema.__name__
    assert set(ModelsParams.model_fields) == set(FAMILIES)


def test_dvc_yaml_templates_every_registered_family_and_no_other():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("sweep", "train", "evaluate"):
        foreach = stages[name]["foreach"]
        assert list(foreach) == list(FAMILIES), name  # a dict's keys or a list's items, in registry order


def test_the_cli_offers_the_registered_families():
    assert [f.value for f in cli.Family] == list(FAMILIES)
    assert [f.value for f in cli.LanguageModel] == list(LANGUAGE_MODELS) == ["lstm_lm", "transformer_lm"]


def test_an_unknown_family_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'gpt'; expected one of captioner, lstm_lm"):
        family("gpt")


def test_each_record_names_an_importable_lightning_module_and_a_direction():
    import pytorch_lightning as pl

    for record in FAMILIES.values():
        assert issubclass(record.lightning_module(), pl.LightningModule), record.name
        assert record.mode in ("min", "max") and record.monitor.startswith("val/")


def test_the_self_critical_epochs_follow_the_cross_entropy_ones_for_the_captioner_only(tiny_params):
    captioner = tiny_params.train.captioner.model_copy(update={"max_epochs": 3, "scst_epochs": 2})
    assert family("captioner").epochs(captioner) == 5
    assert family("lstm_lm").epochs(tiny_params.train.lstm_lm.model_copy(update={"max_epochs": 4})) == 4


def _family_switches(path: Path) -> list[int]:
    """Lines comparing a variable named family/fam with a string literal (== / !=)."""
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            names = [n for n in (node.left, *node.comparators) if isinstance(n, ast.Name | ast.Attribute)]
            literals = [n for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)
                        and n.value in FAMILIES]
            if names and literals:
                lines.append(node.lineno)
    return lines


def test_no_module_switches_on_a_family_name():
    switches = {str(path.relative_to(ROOT)): lines for path in sorted((ROOT / "pipeline").rglob("*.py"))
                if (lines := _family_switches(path))}
    switches.update({str(path.relative_to(ROOT)): lines for path in sorted((ROOT / "stages").glob("*.py"))
                     if (lines := _family_switches(path))})
    assert switches == {}, "compare with the family registry's fields (pipeline/families.py) instead"


def test_a_section_of_no_registered_family_is_an_unknown_key(tiny_params):
    from pipeline.params import ParamsError, validate_params

    tree = tiny_params.to_dict()
    tree["models"]["gpt"] = {"layers": 2}
    with pytest.raises(ParamsError, match=r"models.gpt: unknown key \(neither a setting nor a model family; "
                                          r"families: captioner, lstm_lm, transformer_lm\)"):
        validate_params(tree)


def test_a_missing_family_section_is_named_with_what_a_family_needs(tiny_params):
    with pytest.raises(AttributeError, match=r"no models.gpt section \(a model family needs models.gpt, train.gpt"):
        assert tiny_params.models.gpt is None  # never reached: the lookup raises

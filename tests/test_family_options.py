"""`GBConfig.family_options`: a family's own settings grouped under it, checked against what the family declares;
the old top-level spellings (`second_hidden_dim`, `tile_gain`) still work, with a warning in code and silently
from files; docs/configuration.md is generated from the code."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import HfArgumentParser

from hf_gb import GBConfig, GBPlugin, GBTrainingArguments, GenomicBottleneck
from hf_gb.engine.config import read_config_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_family_option_is_read_with_the_family_default():
    assert GBConfig(family="deep").option("second_hidden_dim") == 8
    assert GBConfig(family="deep", family_options={"second_hidden_dim": 5}).option("second_hidden_dim") == 5
    assert GBConfig(family="shared").option("tile_gain") is True
    with pytest.raises(KeyError, match="'mlp' has no option 'tile_gain'"):
        GBConfig(family="mlp").option("tile_gain")


@pytest.mark.parametrize("family, options, message", [
    ("mlp", {"second_hidden_dim": 4}, "family 'mlp' has no option 'second_hidden_dim' .it takes none.; 'deep' does"),
    ("auto", {"tile_gain": False}, r"family 'auto' has no option 'tile_gain' \(its options: \['lr_multiplier'\]\); "
                                   "'shared' does"),
    ("deep", {"width2": 4}, r"family 'deep' has no option 'width2' \(its options: \['second_hidden_dim'\]\)"),
    ("deep", [4], "family_options must be an object"),
    ("deep", "{not json", "family_options must be a JSON object"),
])
def test_an_option_the_family_does_not_take_is_refused(family, options, message):
    with pytest.raises(ValueError, match=message):
        GBConfig(family=family, family_options=options)


def test_the_old_spellings_move_into_family_options_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"family_options=\{'second_hidden_dim': 4\}"):
        old = GBConfig(family="deep", second_hidden_dim=4)
    assert old == GBConfig(family="deep", family_options={"second_hidden_dim": 4})
    assert old.second_hidden_dim is None and "second_hidden_dim" not in old.to_dict()
    with pytest.warns(DeprecationWarning, match="family 'mlp' does not use it; dropped"):
        unused = GBConfig(family="mlp", tile_gain=False)
    assert unused.family_options is None
    with pytest.raises(ValueError, match="disagree"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        GBConfig(family="deep", second_hidden_dim=4, family_options={"second_hidden_dim": 6})


def test_files_with_the_old_fields_load_silently(tmp_path):
    """Every file of format <= 3 holds both old fields, whatever its family: taken where the family uses them."""
    for family, expected in (("deep", {"second_hidden_dim": 3}), ("shared", {"tile_gain": False}), ("mlp", None)):
        data = {**GBConfig(family=family).to_dict(), "second_hidden_dim": 3, "tile_gain": False, "format_version": 3}
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps(data))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_config_json(str(path))["gb_config"].family_options == expected


@pytest.mark.parametrize("fields, version", [
    ({"family": "deep", "hidden_dim": 4, "tile_size": 8}, 3),
    ({"family": "deep", "hidden_dim": 4, "tile_size": 8, "family_options": {"second_hidden_dim": 3}}, 4),
    ({"compression": 8, "input_shapes": {"0": [4, 4]}}, 5),  # "auto" with an image-reading layer: "coords" g-nets
    ({"compression": 8}, 3),  # "auto" without: random sharing only
])
def test_saved_files_have_the_lowest_format_that_means_what_they_hold(tmp_path, fields, version):
    from safetensors import safe_open

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = GBConfig(**fields)
    gb = GenomicBottleneck(model, config)
    gb.save_pretrained(str(tmp_path), model_card=False)
    gb.detach_model()
    saved = json.loads((tmp_path / "gb_config.json").read_text())
    assert saved["format_version"] == version and "second_hidden_dim" not in saved
    with safe_open(str(tmp_path / "gb_model.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == str(version)  # both files of a save say the same
    assert GBConfig.from_pretrained(tmp_path) == config


def test_training_arguments_and_the_plugin_take_family_options(monkeypatch, tmp_path):
    (args,) = HfArgumentParser(GBTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--gb_family", "deep", "--gb_family_options", '{"second_hidden_dim": 6}'])
    assert args.to_gb_config().option("second_hidden_dim") == 6
    with pytest.warns(DeprecationWarning):  # the old argument still parses
        (old,) = HfArgumentParser(GBTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--gb_family", "deep", "--gb_second_hidden_dim", "6"])
    assert old.to_gb_config().family_options == {"second_hidden_dim": 6}
    monkeypatch.setenv("HF_GB_FAMILY", "shared")
    monkeypatch.setenv("HF_GB_FAMILY_OPTIONS", '{"tile_gain": false}')
    assert GBPlugin().gb_config.option("tile_gain") is False
    with pytest.raises(ValueError, match="GBPlugin: family_options: family 'shared' has no option 'x'"):
        GBPlugin(family_options={"x": 1})


def test_configuration_doc_is_generated_from_the_code():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_configuration.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    for name in [f for f in GBConfig.__dataclass_fields__] + ["gb_learning_rate"]:
        assert f"`{name}`" in text, name
    assert "`HF_GB_DISABLE_COMPILE=1`" in text and "`TORCH_EXTENSIONS_DIR`" in text

import json
import logging
import math

import pytest

import hf_gb
from hf_gb import GBConfig
from hf_gb.engine.config import CONFIG_NAME, FORMAT_VERSION, read_config_json

BAD_VALUES = [
    ("hidden_dim", 0),
    ("hidden_dim", -4),
    ("hidden_dim", 2.5),
    ("hidden_dim", True),
    ("compression", 0.5),
    ("compression", 0),
    ("compression", math.nan),
    ("compression", math.inf),
    ("tile_size", 0),
    ("tile_size", [8]),
    ("tile_size", [8, 0]),
    ("tile_size", [8, 2.5]),
    ("tile_size", [2, 3, 4]),
    ("encoding", "ternary"),
    ("encoding", "Gray"),
    ("kernel", "cuda"),
    ("init_noise", 0.0),
    ("init_noise", math.nan),
    ("min_compression", -1.0),
    ("target_modules", ["q_proj", 3]),
    ("exclude_modules", [None]),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        GBConfig(**{field: value})
    message = str(info.value)
    assert f"{field}=" in message
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(
    "kwargs,attr,expected",
    [
        ({"tile_size": 16}, "tile_size", [16, 16]),
        ({"tile_size": (8, 32)}, "tile_size", [8, 32]),
        ({"compression": 50}, "compression", 50.0),
        ({"target_modules": ("q", "v")}, "target_modules", ["q", "v"]),
        ({"exclude_modules": r".*head"}, "exclude_modules", r".*head"),
    ],
)
def test_values_are_normalised(kwargs, attr, expected):
    value = getattr(GBConfig(**kwargs), attr)
    assert value == expected and type(value) is type(expected)


CONFIGS = [
    {},
    {"hidden_dim": 16, "compression": 50},
    {"tile_size": [8, 32], "encoding": "gray", "stochastic": True, "init_noise": 0.5},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*lm_head", "kernel": "eager", "seed": 3},
    {"target_modules": r"model\.layers\.\d+\.mlp\..*", "min_compression": 4.0},
    {"family": "deep", "family_options": {"second_hidden_dim": 16}},
    {"input_shapes": {"fc1": [28, 28]}, "compression": 300},
    {"family": "coords", "family_options": {"lr_multiplier": 4.0}},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_dict_round_trip(kwargs):
    config = GBConfig(**kwargs)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-safe
    assert GBConfig.from_dict(data) == config


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_save_pretrained_round_trip(tmp_path, kwargs):
    config = GBConfig(**kwargs)
    path = config.save_pretrained(tmp_path / "ckpt")
    assert path.endswith(CONFIG_NAME)
    with open(path) as f:
        saved = json.load(f)
    assert saved["hf_gb_version"] == hf_gb.__version__
    # Format 5 only where the file may hold "coords" g-nets and 4 only where it needs family options, so that older
    # hf_gb reads the rest.
    coords = config.family == "coords" or bool(config.input_shapes)
    assert saved["format_version"] == (FORMAT_VERSION if coords else 4 if config.family_options else 3)
    assert ("family_options" in saved) == bool(config.family_options or coords)
    assert GBConfig.from_pretrained(tmp_path / "ckpt") == config
    assert GBConfig.from_pretrained(path) == config  # the file itself works too
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name != CONFIG_NAME]  # no temp files left


def test_unknown_keys_dropped_with_warning(caplog):
    data = {**GBConfig(hidden_dim=8).to_dict(), "future_option": 1, "another": "x"}
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.config"):
        config = GBConfig.from_dict(data)
    assert config == GBConfig(hidden_dim=8)
    assert "future_option" in caplog.text and "another" in caplog.text


def test_meta_keys_are_not_reported_as_unknown(caplog):
    data = {**GBConfig().to_dict(), "hf_gb_version": "0.0.1", "format_version": 1, "tensors": []}
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.config"):
        assert GBConfig.from_dict(data) == GBConfig()
    assert caplog.text == ""


def test_from_pretrained_drops_unknown_keys_in_file(tmp_path, caplog):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"hidden_dim": 12, "made_up": True, "hf_gb_version": "9"}))
    with caplog.at_level(logging.WARNING, logger="hf_gb.engine.config"):
        # A file without format_version is of format 1: what it leaves out means what it meant then.
        assert GBConfig.from_pretrained(tmp_path) == GBConfig(hidden_dim=12, family="mlp", kernel_code="one_hot")
    assert "made_up" in caplog.text


def test_newer_format_version_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="format_version"):
        read_config_json(str(tmp_path / CONFIG_NAME))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        GBConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GBConfig.from_pretrained(tmp_path)


def test_shipped_metric_is_reachable_from_the_top_level_package():
    import hf_gb

    assert hf_gb.metrics.path("accuracy").endswith("accuracy.py")
    with pytest.raises(ValueError, match="no metric 'nope'"):
        hf_gb.metrics.path("nope")

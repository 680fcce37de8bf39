"""The benchmarks' --quick modes run end to end and write JSON with the expected fields and sane values; the
equal-storage baselines count stored values the way a checkpoint holds them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import baselines  # noqa: E402
import common  # noqa: E402
import quality_digits  # noqa: E402
import quality_lm  # noqa: E402
import quality_mnist  # noqa: E402
import speed  # noqa: E402

from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402


def run_quick(script: str, tmp_path, extra: list[str] = ()) -> tuple[dict, str]:
    out = tmp_path / script.replace(".py", "")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(str(out) + ".json", encoding="utf-8") as f:
        payload = json.load(f)
    assert payload["quick"] is True
    assert payload["machine"]["torch"]
    return payload, proc.stdout


@pytest.mark.parametrize("script", ["quality_digits.py", "quality_lm.py", "speed.py"])
def test_quick_mode(script, tmp_path):
    payload, stdout = run_quick(script, tmp_path)
    out = tmp_path / script.replace(".py", "")
    assert os.path.getsize(str(out) + ".png") > 1000
    assert f"{out}.png" in stdout.splitlines()[-1]
    if script == "quality_digits.py":
        methods = {(s["model"], s["method"]) for s in payload["summary"]}
        expected = {("mlp", m) for m in ("plain", "gb", "hash", "narrow", "lowrank", "innate", "alternating")}
        assert expected | {("cnn", m) for m in ("gb", "hash", "narrow", "lowrank")} <= methods
        for s in payload["summary"]:
            assert 0.0 <= s["mean"] <= 1.0
            assert s["stored"] > 0
        plain = [s["mean"] for s in payload["summary"] if s["method"] == "plain" and s["model"] == "mlp"][0]
        assert plain > 0.5  # a few epochs of plain training already beat chance (0.1) by far
        gb = [s for s in payload["summary"] if s["method"] == "gb" and s["model"] == "mlp"]
        assert max(s["ratio"] for s in gb) > 100  # the real covered ratio of the highest target is reported
        narrow = [s for s in payload["summary"] if s["method"] == "narrow"]
        assert narrow and all(abs(s["stored_vs_gb"]) <= 0.03 for s in narrow)
        hashed = [s for s in payload["summary"] if s["method"] == "hash"]
        assert len(hashed) == 4 and all(abs(s["stored_vs_gb"]) <= 0.01 for s in hashed)  # 2 models x 2 targets
        assert sorted(g["lr"] for g in payload["grid"] if g["method"] == "hash" and g["model"] == "mlp"
                      and g["target"] == 10) == [3e-3, 1e-2]  # its own LR grid
        # the grid keeps every LR; the summary shows the best of them
        grid = [g for g in payload["grid"] if g["model"] == "mlp" and g["method"] == "narrow" and g["target"] == 10]
        assert sorted(g["lr"] for g in grid) == [3e-3, 1e-2]
        best = [s for s in narrow if s["model"] == "mlp" and s["target"] == 10][0]
        assert best["mean"] == max(g["mean"] for g in grid)
    elif script == "quality_lm.py":
        runs = payload["runs"]
        assert {r["method"] for r in runs} == {"plain", "gb", "hash", "narrow", "lowrank"}
        assert len([r for r in runs if r["method"] == "narrow"]) == 2  # the LR grid of --quick
        for r in runs:
            assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(257) + 1
            assert r["tokens"] == runs[0]["tokens"]  # equal steps and equal tokens
        gb = [r for r in runs if r["method"] == "gb"][0]
        assert gb["covered_compression"] > 2 and gb["stored"] == gb["gb_stored"]
        for r in runs:
            if r["method"] == "narrow":
                assert abs(r["stored"] / gb["stored"] - 1) <= 0.03
            if r["method"] == "hash":  # equal stored values within 1%, at its own covered compression
                assert abs(r["stored"] / gb["stored"] - 1) <= 0.01 and r["covered_compression"] > 2
        summary = {s["method"]: s for s in payload["summary"]}
        assert summary["narrow"]["val_loss"] == min(r["val_loss"] for r in runs if r["method"] == "narrow")
        assert len([r for r in runs if r["method"] == "hash"]) == 2  # its own LR grid
        assert summary["hash"]["val_loss"] == min(r["val_loss"] for r in runs if r["method"] == "hash")
    else:
        (row,) = payload["rows"]
        assert row["plain_step_s"] > 0 and row["gb_step_s"] > 0 and row["step_ratio"] > 0
        assert row["plain_peak_rss_mb"] > 50 and row["gb_peak_rss_mb"] > 50
        assert row["covered_compression"] > 2


@pytest.mark.parametrize("trainer", [False, True], ids=["mlp", "trainer"])
def test_quick_mode_quality_mnist(trainer, tmp_path):
    """Both parts: every method, equal storage, the real covered compression, a note where GB misses its target,
    and the GB rows built from the flags (a GBConfig field passed through --gb)."""
    extra = ["--trainer"] if trainer else ["--hidden_dim", "16", "--gb", "init_active=0.05"]
    payload, stdout = run_quick("quality_mnist.py", tmp_path, extra)
    assert os.path.getsize(str(tmp_path / "quality_mnist") + ".png") > 1000
    summary = {s["method"]: s for s in payload["summary"]}
    assert set(summary) == {"plain", "gb", "hash", "narrow"} | (set() if trainer else {"lowrank"})
    gb = summary["gb"]
    assert gb["ratio"] > 10 and gb["stored"] > 0 and summary["plain"]["mean"] > 0.5
    assert abs(summary["hash"]["stored_vs_gb"]) <= 0.01 and summary["hash"]["ratio"] > 10
    for s in payload["summary"]:
        assert 0.0 <= s["mean"] <= 1.0 and s["stored"] > 0
    assert bool(gb["note"]) == (not 30 / 1.25 <= gb["ratio"] <= 30 * 1.25 if trainer else
                                not 300 / 1.25 <= gb["ratio"] <= 300 * 1.25)
    if not trainer:
        assert payload["gb_fields"] == {"hidden_dim": 16, "init_active": 0.05}
        (row,) = [r for r in payload["runs"] if r["method"] == "gb"]
        assert row["config"]["hidden_dim"] == 16 and row["config"]["init_active"] == 0.05


def test_mnist_gb_flags_are_checked_at_parse_time():
    with pytest.raises(ValueError, match="init_active"):
        quality_mnist.parse_args(["--gb", "init_active=2"])
    with pytest.raises(SystemExit, match="key=value"):
        quality_mnist.parse_args(["--gb", "init_active"])
    with pytest.raises(SystemExit, match="GBConfig has no field 'init_activ'"):
        quality_mnist.parse_args(["--gb", "init_activ=0.1"])
    assert quality_mnist.gb_fields(quality_mnist.parse_args([])) == {}  # GB defaults: GBConfig(compression=C)


def test_hash_config_matches_the_budget():
    build = lambda: nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))  # noqa: E731
    gb = GenomicBottleneck(build(), GBConfig(hidden_dim=4, compression=30))
    budget = baselines.stored_values(gb)
    cfg, stored = baselines.hash_config(build, budget)
    assert cfg.family == "hash" and cfg.center is False and abs(stored / budget - 1) <= 0.01
    assert baselines.stored_values(GenomicBottleneck(build(), cfg)) == stored
    cfg, stored = baselines.hash_config(build, 10)  # below one value per tensor: the fewest it can store
    assert stored == baselines.stored_values(GenomicBottleneck(build(), cfg)) > 10


@pytest.mark.parametrize("module", [quality_digits, quality_lm, quality_mnist, speed])
def test_quick_never_writes_over_committed_results(module):
    full, quick = module.parse_args([]).out, module.parse_args(["--quick"]).out
    assert os.path.dirname(full) == common.RESULTS
    assert not os.path.abspath(quick).startswith(common.RESULTS + os.sep)
    assert os.path.basename(quick) != os.path.basename(full)
    assert module.parse_args(["--quick", "--out", "/tmp/x"]).out == "/tmp/x"  # an explicit --out still wins


def test_lm_default_threads_match_committed_results():
    assert quality_lm.parse_args([]).threads == 1
    assert quality_digits.parse_args([]).threads == 1


def test_png_reported_only_when_written(tmp_path, capsys):
    out = str(tmp_path / "empty")
    quality_lm.finish({"runs": [], "args": {}, "quick": True}, out)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out}.json" and not os.path.exists(out + ".png")


# ----------------------------------------------------------------------------- stored values and baselines
def test_stored_values_of_gb_match_the_checkpoint_file(tmp_path):
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    gb = GenomicBottleneck(model, GBConfig(hidden_dim=4, compression=8))
    gb.save_pretrained(str(tmp_path), model_card=False)
    in_file = sum(t.numel() for t in load_file(str(tmp_path / "gb_model.safetensors")).values())
    assert baselines.stored_values(gb) == in_file
    assert baselines.stored_values(gb) > gb.stats()["gnet_params"]  # biases (uncompressed) and scales count too


def test_stored_values_count_shared_tensors_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    assert baselines.stored_values(model) == 80
    model[1].weight = model[0].weight
    assert baselines.stored_values(model) == 40


@pytest.mark.parametrize("budget", [10, 1000, 5000, 100_000])
def test_allocate_ranks(budget):
    shapes = {"a": (64, 256), "b": (256, 256), "c": (10, 256)}  # rank 1 everywhere costs 320 + 512 + 266 = 1098
    ranks = baselines.allocate_ranks(shapes, budget)
    used = sum(r * sum(shapes[n]) for n, r in ranks.items())
    assert all(r >= 1 for r in ranks.values())
    assert all(r * sum(shapes[n]) < math.prod(shapes[n]) for n, r in ranks.items())  # factors beat dense storage
    if budget < 1098:
        assert set(ranks.values()) == {1}  # the floor, over budget: the caller reports the real storage
    elif budget == 5000:
        assert abs(used - budget) <= 266 and max(ranks.values()) - min(ranks.values()) <= 1  # equal ranks
    else:
        assert ranks["c"] == 9  # capped where 10 x 256 would be stored cheaper dense
        assert used <= budget + 512


def test_low_rank_model_matches_budget_and_factors():
    torch.manual_seed(0)
    model = quality_digits.mlp()
    gb = GenomicBottleneck(quality_digits.mlp(), GBConfig(hidden_dim=8, compression=10))
    names = [t.name.rpartition(".")[0] for t in gb.covered]
    budget = baselines.stored_values(gb)
    info = baselines.low_rank_(model, names, budget, seed=0)
    assert info["stored_values"] == baselines.stored_values(model)
    assert abs(info["stored_values"] / budget - 1) < 0.05
    layer = model[0]
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ (layer.U @ layer.V).t() + layer.bias)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    low = baselines.LowRankConv2d(conv, 2, torch.Generator().manual_seed(0))
    assert low(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)
    assert baselines.stored_values(low) == 2 * 4 * 9 + 6 * 2 + 6


def test_narrow_models_counted_like_their_state_dict():
    from examples.train import build_model

    args = quality_lm.parse_args([])
    for hidden, inter in [(128, 384), (40, 95), (16, 7)]:
        model = build_model(quality_lm.script_args(args, hidden, inter), 257)
        assert baselines.stored_values(model) == quality_lm.narrow_size(args, 257, hidden, inter)
    for spec in [(256, 256), (22, 20)]:
        assert baselines.stored_values(quality_digits.fresh("mlp", 0, spec)) == quality_digits.narrow_size("mlp", spec)
    for spec in [((16, 32, 64), 128), ((3, 5, 9), 11)]:
        assert baselines.stored_values(quality_digits.fresh("cnn", 0, spec)) == quality_digits.narrow_size("cnn", spec)


@pytest.mark.parametrize("target", [600, 2200, 9000])
def test_narrow_spec_within_tolerance(target):
    spec, size = quality_digits.narrow_spec("mlp", target)
    assert size == quality_digits.narrow_size("mlp", spec)
    assert abs(size / target - 1) <= baselines.TOLERANCE
    args = quality_lm.parse_args([])
    (hidden, inter), size = quality_lm.narrow_spec(args, 257, target * 20)
    assert abs(size / (target * 20) - 1) <= baselines.TOLERANCE and hidden % 8 == 0

"""The benchmarks' --quick modes run end to end and write JSON with the expected fields and sane values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script: str, tmp_path, extra: list[str] = ()) -> dict:
    out = tmp_path / script.replace(".py", "")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert os.path.getsize(str(out) + ".png") > 1000
    with open(str(out) + ".json", encoding="utf-8") as f:
        payload = json.load(f)
    assert payload["quick"] is True
    assert payload["machine"]["torch"]
    return payload


@pytest.mark.parametrize("script", ["quality_digits.py", "quality_lm.py", "speed.py"])
def test_quick_mode(script, tmp_path):
    payload = run_quick(script, tmp_path)
    if script == "quality_digits.py":
        methods = {(s["model"], s["method"]) for s in payload["summary"]}
        assert {("mlp", "plain"), ("mlp", "gb"), ("mlp", "innate"), ("mlp", "alternating"), ("cnn", "gb")} <= methods
        for s in payload["summary"]:
            assert 0.0 <= s["mean"] <= 1.0
            assert s["ratio"] >= 1.0
        plain = [s["mean"] for s in payload["summary"] if s["method"] == "plain" and s["model"] == "mlp"][0]
        assert plain > 0.5  # a few epochs of plain training already beat chance (0.1) by far
        gb = [s for s in payload["summary"] if s["method"] == "gb" and s["model"] == "mlp"]
        assert max(s["ratio"] for s in gb) > 100  # the real covered ratio of the highest target is reported
    elif script == "quality_lm.py":
        runs = payload["runs"]
        assert [r["mode"] for r in runs] == ["plain", "gb"]
        assert runs[1]["covered_compression"] > 2
        for r in runs:
            assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(257) + 1
            assert r["tokens"] == runs[0]["tokens"]  # equal steps and equal tokens
    else:
        (row,) = payload["rows"]
        assert row["plain_step_s"] > 0 and row["gb_step_s"] > 0 and row["step_ratio"] > 0
        assert row["plain_peak_rss_mb"] > 50 and row["gb_peak_rss_mb"] > 50
        assert row["covered_compression"] > 2

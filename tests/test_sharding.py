"""Shard-local prediction (hf_gb.engine.shards): row arithmetic and tile selection in one process, then the engine on
an FSDP2 model over 2 gloo processes (torchrun) against a single-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from hf_gb.engine.shards import RowShard, _chunk_offset, grad_tiles, local_tiles, tile_rows, write_rows
from hf_gb.engine.tiling import TileGeometry, grid, tile, untile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_GB_DISABLE_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(script: str, *args: str, env: dict[str, str] | None = None, nproc: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.join(SCRIPTS, script), *args]
    result = subprocess.run(command, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.parametrize("rows,chunks", [(7, 2), (19, 2), (1, 2), (10, 3), (5, 4)])
def test_chunk_offsets_follow_torch_chunk(rows, chunks):
    pieces = torch.arange(rows).chunk(chunks)
    for index in range(chunks):
        size, offset = _chunk_offset(rows, chunks, index)
        expected = pieces[index] if index < len(pieces) else torch.zeros(0)
        assert size == len(expected)
        if size:
            assert offset == int(expected[0])


@pytest.mark.parametrize(
    "shape,geometry,start,stop",
    [((19, 20, 1), TileGeometry(8, 8), 10, 19), ((19, 20, 1), TileGeometry(8, 8), 0, 10),
     ((11, 9, 3), TileGeometry(4, 5, 3), 3, 9), ((16, 16, 1), TileGeometry(8, 16), 8, 16)],
)
def test_rows_round_trip_through_local_tiles(shape, geometry, start, stop):
    w = torch.randn(shape)
    all_tiles = tile(w, geometry)
    shard = RowShard(start, stop, shape[0], None)
    index = local_tiles(shape, geometry, shard)
    rows = tile_rows(shard, geometry)
    assert len(index) == len(rows) * grid(shape, geometry)[1]
    # Each selected tile intersects [start, stop), and no tile outside the selection does.
    per_row = grid(shape, geometry)[1]
    for i in range(len(all_tiles)):
        lo = (i // per_row) * geometry.rows
        assert (i in index.tolist()) == (lo < stop and lo + geometry.rows > start)
    local = torch.zeros(stop - start, *shape[1:])
    write_rows(local, all_tiles[index], shape, geometry, shard)
    torch.testing.assert_close(local, w[start:stop], rtol=0, atol=0)
    # The gradient of the selected tiles holds exactly this shard's rows (zeros elsewhere).
    G = torch.empty(len(index), geometry.rows, geometry.cols * geometry.kernel)
    grad_tiles(G, w[start:stop], shape, geometry, shard)
    mask = torch.zeros(shape)
    mask[start:stop] = 1
    torch.testing.assert_close(G, tile(w * mask, geometry)[index], rtol=0, atol=0)
    assert torch.equal(untile(tile(w, geometry), shape, geometry), w)


def test_empty_shard_selects_nothing():
    shard = RowShard(3, 3, 3, None)
    assert len(local_tiles((3, 8, 1), TileGeometry(3, 8), shard)) == 0


def test_engine_on_fully_shard_matches_one_process(tmp_path):
    """Uneven shards (19 rows -> 10 + 9, tiles straddling the boundary), gradient accumulation 1 and 3, learned
    noise, bf16 MixedPrecisionPolicy and row/column gains (their rows split over the ranks): predictions and g-net
    gradients equal one process's (the script asserts every comparison; here we check that it made them)."""
    torchrun("fsdp_engine.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert set(reports[0]) == {"accum1", "accum3", "stochastic", "bf16", "gains"}
    assert reports[0]["accum1"]["shards"] == {"0.weight": [0, 10], "2.weight": [0, 6], "4.weight": [0, 2]}
    assert reports[1]["accum1"]["shards"] == {"0.weight": [10, 19], "2.weight": [6, 11], "4.weight": [2, 3]}
    for report in reports:
        for name, case in report.items():
            grads = [k for k in case["max_diff"] if "/grad/" in k]
            assert len(grads) >= 3 * 4, (name, sorted(case["max_diff"]))  # 3 steps x (w_row, w_col, b1, w2)
            limit = 5e-2 if name == "bf16" else 1e-5
            assert max(case["max_diff"].values()) < limit, (name, case["max_diff"])


def test_trainer_under_fsdp2_trains_saves_and_resumes_exactly(tmp_path):
    """GBTrainer with Accelerate's FSDP2 forced on CPU (the script says how and why), gradient accumulation 3:
    the covered weights are Shard(0) DTensors, both ranks hold the same g-nets after every step, a run resumed from
    the step-2 checkpoint ends with exactly the g-nets and logits of the uninterrupted run, and the final
    compressed checkpoint loads in one process with `load_compressed` and gives the sharded model's logits."""
    from hf_gb import load_compressed

    out, reports, resumed = tmp_path / "out", tmp_path / "rep", tmp_path / "rep2"
    reports.mkdir()
    resumed.mkdir()
    torchrun("fsdp_trainer.py", str(out), str(reports), "4", "")
    run = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    assert run[0]["fsdp_model"] == "FSDPLlamaForCausalLM"
    assert len(run[0]["placements"]) == run[0]["n_covered"] == 15
    assert all(p == ["S(0)"] for p in run[0]["placements"].values())
    assert [s["step"] for s in run[0]["steps"]] == [1, 2, 3, 4]
    assert run[0]["steps"] == run[1]["steps"]  # replicated g-nets
    assert run[0]["steps"][0]["gnet"] != run[0]["steps"][-1]["gnet"]  # and they trained
    assert set(os.listdir(out / "checkpoint-2")) >= {"gb_config.json", "gb_model.safetensors",
                                                     "optimizer.rank0-of-2.safetensors",
                                                     "optimizer.rank1-of-2.safetensors"}
    assert not any(n.startswith("pytorch_model_fsdp") for n in os.listdir(out / "checkpoint-2"))

    torchrun("fsdp_trainer.py", str(tmp_path / "out2"), str(resumed), "4", str(out / "checkpoint-2"))
    again = json.loads((resumed / "rank0.json").read_text())
    assert [s["step"] for s in again["steps"]] == [3, 4]
    assert again["steps"] == run[0]["steps"][2:]
    assert again["logits"] == run[0]["logits"]

    model = load_compressed(str(out / "final"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))).logits
    torch.testing.assert_close(logits, torch.tensor(run[0]["logits"]), rtol=1e-5, atol=1e-5)


def test_plugin_under_fsdp2_matches_one_process(tmp_path):
    """GBPlugin in a custom loop with Accelerate's FSDP2 forced on CPU (see tests/scripts/force_fsdp.py), gradient
    accumulation 3, prepared with `GBPlugin.accelerator_prepare`: after every optimizer step the g-nets (and
    their gradients before it) equal a whole model trained in one process; the compressed checkpoint written by
    the main process loads in one process and gives the sharded model's outputs."""
    torchrun("fsdp_plugin.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert len(report["diffs"]) == len(report["grad_diffs"]) == 3
        assert max(report["diffs"] + report["grad_diffs"]) < 1e-5, report
        torch.testing.assert_close(torch.tensor(report["logits"]), torch.tensor(report["ref_logits"]))
    assert reports[0]["gnet"] == reports[1]["gnet"]

    sys.path.insert(0, SCRIPTS)
    try:
        from fsdp_plugin import X, make_model
    finally:
        sys.path.remove(SCRIPTS)
    from hf_gb import GenomicBottleneck

    model = make_model()
    GenomicBottleneck.from_pretrained(str(tmp_path / "ckpt"), model=model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), torch.tensor(reports[0]["logits"]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- distributed glue, one process
def test_detach_and_reattach_params_restore_groups():
    from hf_gb.training.distributed import detach_params, reattach_params

    a, b, c = (torch.nn.Parameter(torch.randn(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b], "lr": 0.1}, {"params": [c], "lr": 0.5}], lr=0.1)
    taken = detach_params(opt, [a, c])
    assert [g["params"] for g in opt.param_groups] == [[b]]
    opt.param_groups[0] = {**opt.param_groups[0]}  # prepare may rebuild the group dicts
    reattach_params(opt, taken)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(a), id(b)], [id(c)]]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_optimizer_shard_round_trip(tmp_path):
    from hf_gb.training.distributed import load_optimizer_shard, save_optimizer_shard

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.9))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    save_optimizer_shard(opt, str(tmp_path), 0, 1)
    fresh = torch.optim.AdamW(params, lr=0.5)
    load_optimizer_shard(fresh, str(tmp_path), 0, 1)
    assert fresh.param_groups[0]["lr"] == 0.01 and list(fresh.param_groups[0]["betas"]) == [0.8, 0.9]
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key]), key
    with pytest.raises(ValueError, match="same number of processes \\(2\\)"):
        load_optimizer_shard(fresh, str(tmp_path), 0, 2)


def test_check_setup_refuses_fsdp1_and_warns_on_fallback(caplog):
    import types

    from hf_gb.training.distributed import check_setup

    def accel(**state):
        return types.SimpleNamespace(state=types.SimpleNamespace(**state), num_processes=2)

    with pytest.raises(NotImplementedError, match="fsdp_version=1"):
        check_setup(accel(fsdp_plugin=types.SimpleNamespace(fsdp_version=1)), True, False, "X")
    assert check_setup(accel(fsdp_plugin=types.SimpleNamespace(fsdp_version=2)), True, False, "X") == "fsdp2"
    with pytest.raises(NotImplementedError, match="ZeRO stage 0"):  # stages 1 to 3: tests/test_deepspeed.py
        check_setup(accel(deepspeed_plugin=types.SimpleNamespace(zero_stage=0)), False, True, "X")
    with caplog.at_level("WARNING", logger="hf_gb.training.distributed"):
        assert check_setup(accel(), True, False, "X") == "ddp"
    assert "FSDP was requested but Accelerate did not enable it" in caplog.text


def test_fsdp_example_runs(tmp_path):
    """examples/train_fsdp.py as the README runs it (fewer steps): loss goes down, the reloaded checkpoint agrees."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "examples", "train_fsdp.py"), "--steps", "6",
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0], result.stdout  # steps 0 and 5
    assert "max |logit difference| 0.00e+00" in result.stdout, result.stdout
    assert "rank 0: predicts 60 of 120 tiles" in result.stdout and "rank 1: predicts 68 of 120 tiles" in result.stdout


def test_trainer_under_fsdp2_matches_ddp(tmp_path):
    """The same GBTrainer run (same initial weights on both ranks, SGD, gradient accumulation 3) under forced
    FSDP2 and under DDP: the g-nets after every step and the final logits agree."""
    runs = {}
    for mode in ("fsdp-sgd", "ddp-sgd"):
        reports = tmp_path / mode
        reports.mkdir()
        torchrun("fsdp_trainer.py", str(tmp_path / f"out-{mode}"), str(reports), "3", "", mode)
        runs[mode] = json.loads((reports / "rank0.json").read_text())
    fsdp, ddp = runs["fsdp-sgd"], runs["ddp-sgd"]
    assert fsdp["fsdp_model"] == "FSDPLlamaForCausalLM" and ddp["fsdp_model"] == "LlamaForCausalLM"
    assert [s["step"] for s in fsdp["steps"]] == [s["step"] for s in ddp["steps"]] == [1, 2, 3]
    assert fsdp["steps"][0]["gnet"] != fsdp["steps"][-1]["gnet"]
    for a, b in zip(fsdp["steps"], ddp["steps"]):
        torch.testing.assert_close(torch.tensor(a["gnet"]), torch.tensor(b["gnet"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(fsdp["logits"]), torch.tensor(ddp["logits"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,world", [((7, 5, 1), 2), ((4, 3, 2), 3), ((1, 9, 1), 4), ((6, 4, 1), 2)])
def test_zero3_partitions_cover_every_element_once(shape, world, monkeypatch):
    """DeepSpeed ZeRO-3 partitions (flat, rank * ceil(numel / world) on, the last padded): the rows each rank's
    partition touches, its buffer of them and what `publish_partitions` writes give back every element once."""
    import types

    from hf_gb.engine.partitions import publish_partitions
    from hf_gb.engine.shards import ds_partition

    numel, size = shape[0] * shape[1] * shape[2], -(-shape[0] * shape[1] * shape[2] // world)
    weight = torch.randn(shape)
    rebuilt = torch.full((numel,), float("nan"))
    for rank in range(world):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        param = types.SimpleNamespace(ds_tensor=torch.zeros(size), ds_shape=torch.Size(shape[:2]), ds_numel=numel)
        shard = ds_partition(param, shape)
        f0, f1 = shard.flat
        assert (f0, f1) == (min(numel, rank * size), min(numel, (rank + 1) * size))
        assert shard.data.shape == (shard.stop - shard.start, shape[1], shape[2])
        shard.data.copy_(weight[shard.start : shard.stop])
        publish_partitions([types.SimpleNamespace(name="w", param=param)], {"w": shard})
        assert torch.isnan(rebuilt[f0:f1]).all()  # nobody wrote these before
        rebuilt[f0:f1] = param.ds_tensor[: f1 - f0]
    assert torch.equal(rebuilt, weight.reshape(-1))

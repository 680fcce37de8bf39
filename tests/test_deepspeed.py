"""DeepSpeed ZeRO (hf_gb.training.deepspeed, hf_gb.training.distributed): GBTrainer at stages 1 and 2 and GBPlugin at
stage 2 train like DDP over 2 gloo processes (torchrun, DS_ACCELERATOR=cpu) and resume exactly; GBTrainer at stage 3
trains like one process with each rank predicting its own partitions; stage 0, (for GBTrainer) a DeepSpeed optimizer
section and (for GBPlugin) stage 3 are refused at start with the reason."""

import json
import os
import subprocess
import sys

import pytest
from test_sharding import SCRIPTS, subprocess_env, torchrun

from hf_gb import GBTrainer, GBTrainingArguments

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")

CPU = {"DS_ACCELERATOR": "cpu"}


def reports(folder):
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]


def run(out, rep, steps, resume, mode):
    os.makedirs(rep, exist_ok=True)
    torchrun("ds_trainer.py", str(out), str(rep), str(steps), str(resume), mode, env=CPU)
    return reports(rep)


def flat(logits):
    return [x for batch in logits for row in batch for x in row]


def close(a, b, tol):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


def test_zero2_trains_like_ddp_and_resumes_exactly(tmp_path):
    """Same initial weights, plain SGD, gradient accumulation 3, clipping on: ZeRO-2 and DDP give the same g-nets
    and uncompressed tensors after every step (to float rounding: the reductions differ in order); both ranks hold
    the same; a run resumed from DeepSpeed's step-2 checkpoint ends with exactly the uninterrupted run's g-nets and
    logits; the g-nets never stay in the model's state_dict."""
    ds = run(tmp_path / "ds", tmp_path / "rep_ds", 4, "", "zero2")
    ddp = run(tmp_path / "ddp", tmp_path / "rep_ddp", 4, "", "ddp")
    assert ds[0]["wrapped"] == "DeepSpeedEngine" and ddp[0]["wrapped"] == "DistributedDataParallel"
    assert ds[0]["steps"] == ds[1]["steps"] and ds[0]["state_keys"] == []
    assert [s["step"] for s in ds[0]["steps"]] == [1, 2, 3, 4]
    first, last = ds[0]["steps"][0]["gnet"], ds[0]["steps"][-1]["gnet"]
    assert max(abs(a - b) for a, b in zip(first, last)) > 1e-3  # the g-nets did train
    for a, b in zip(ds[0]["steps"], ddp[0]["steps"]):
        assert close(a["gnet"], b["gnet"], 1e-5), (a["step"], a["gnet"], b["gnet"])
        assert close(a["uncompressed"], b["uncompressed"], 1e-5), a["step"]
    assert close(flat(ds[0]["logits"]), flat(ddp[0]["logits"]), 1e-5)

    assert os.path.isdir(tmp_path / "ds" / "checkpoint-2" / "global_step2")  # DeepSpeed's own optimizer state
    resumed = run(tmp_path / "ds", tmp_path / "rep_resumed", 4, tmp_path / "ds" / "checkpoint-2", "zero2")
    assert [s["step"] for s in resumed[0]["steps"]] == [3, 4]
    assert resumed[0]["steps"][-1]["gnet"] == ds[0]["steps"][-1]["gnet"]
    assert flat(resumed[0]["logits"]) == flat(ds[0]["logits"])

    import torch

    from hf_gb import load_compressed

    model = load_compressed(str(tmp_path / "ds" / "final"))
    ids = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert close(flat(model(input_ids=ids).logits.tolist()), flat(ds[0]["logits"]), 1e-5)


def test_zero1_trains_like_ddp(tmp_path):
    ds = run(tmp_path / "ds", tmp_path / "rep_ds", 2, "", "zero1")
    ddp = run(tmp_path / "ddp", tmp_path / "rep_ddp", 2, "", "ddp")
    for a, b in zip(ds[0]["steps"], ddp[0]["steps"]):
        assert close(a["gnet"], b["gnet"], 1e-5), a["step"]


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))


@pytest.mark.parametrize(
    "zero,extra,message",
    [({"stage": 0}, {}, "ZeRO stage 0: stage 0 is plain data parallelism"),
     ({"stage": 2}, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "'optimizer' section")],
)
def test_unsupported_deepspeed_configs_are_refused(tmp_path, monkeypatch, zero, extra, message):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", **extra}
    args = GBTrainingArguments(str(tmp_path), report_to="none", use_cpu=True, deepspeed=config)
    with pytest.raises(NotImplementedError, match=message):
        GBTrainer(model=tiny_model(), args=args)


def test_zero3_trains_like_one_process_with_each_rank_predicting_its_partitions(tmp_path):
    """Two ZeRO-3 processes and one plain process, the same 12 sequences as one step, SGD with clipping, three
    steps: the same g-nets, uncompressed tensors and g-net gradients after every step (1e-6 of the largest value),
    the same logits; each rank owns other elements of each covered weight and predicts only the tiles over them; the
    compressed checkpoint the ZeRO-3 run saved loads in this one process to those logits."""
    import torch

    from hf_gb import load_compressed

    for mode in ("single", "zero3"):
        (tmp_path / mode).mkdir()
    run_single = [sys.executable, os.path.join(SCRIPTS, "ds_zero3.py"), str(tmp_path / "out1"),
                  str(tmp_path / "single"), "single"]
    result = subprocess.run(run_single, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun("ds_zero3.py", str(tmp_path / "out3"), str(tmp_path / "zero3"), "zero3", env=CPU)
    one = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "zero3" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["wrapped"] == "DeepSpeedEngine" and len(one["steps"]) == 3
    for zero3 in ranks:
        assert [s["step"] for s in zero3["steps"]] == [1, 2, 3]
        for a, b in zip(one["steps"], zero3["steps"]):
            for key in ("gnet", "uncompressed", "grad"):
                error = float((a[key] - b[key]).abs().max() / a[key].abs().max())
                assert error < 1e-6, (a["step"], key, error)
        assert float((zero3["logits"] - one["logits"]).abs().max() / one["logits"].abs().max()) < 1e-6
        assert zero3["tiles"]["local"] < zero3["tiles"]["all"]  # partition-local prediction
    assert one["steps"][-1]["gnet"].sub(one["steps"][0]["gnet"]).abs().max() > 1e-3  # the g-nets did train
    first, second = (r["shards"] for r in ranks)
    assert first.keys() == second.keys() and len(first) > 0
    for name in first:  # the two ranks own the two halves of every covered weight
        assert first[name][2][0] == 0 and first[name][2][1] == second[name][2][0] and second[name][2][1] > 0
    model = load_compressed(str(tmp_path / "out3" / "final"))
    ids = torch.randint(0, 63, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert float((logits - one["logits"]).abs().max() / one["logits"].abs().max()) < 1e-6


def test_zero3_refuses_covered_weights_deepspeed_keeps_whole():
    import types

    from hf_gb.training.distributed import bind_zero3

    param = types.SimpleNamespace(ds_persist=True, ds_numel=1024)
    gb = types.SimpleNamespace(covered=[types.SimpleNamespace(name="layer.weight", param=param)])
    with pytest.raises(ValueError, match="stage3_param_persistence_threshold below the smallest covered weight"):
        bind_zero3(None, gb)


def test_plugin_under_zero2_trains_like_ddp_and_resumes_exactly(tmp_path):
    """A custom loop (tests/scripts/accelerate_ddp.py's) with plugin.accelerator_prepare: ZeRO-2 and DDP give the same
    model and g-nets after 4 steps of gradient accumulation 2 from rank-dependent initial models; both ranks agree;
    save_state, 2 steps, load_state, the same 2 steps: the same state exactly."""
    import torch

    for mode in ("zero2", "ddp"):
        (tmp_path / mode).mkdir()
        torchrun("ds_plugin.py", str(tmp_path / mode), mode, env=CPU)
    ds = [torch.load(tmp_path / "zero2" / f"rank{r}.pt") for r in range(2)]
    ddp = torch.load(tmp_path / "ddp" / "rank0.pt")
    assert ds[0]["wrapped"] == "DeepSpeedEngine" and ddp["wrapped"] == "DistributedDataParallel"
    assert ds[0]["keys"] == []
    for key, value in ds[0]["state"].items():
        assert torch.equal(value, ds[1]["state"][key]), key
        torch.testing.assert_close(value, ddp["state"][key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    moved = max(float((ds[0]["continued"][k] - ds[0]["state"][k]).abs().max()) for k in ds[0]["state"])
    assert moved > 1e-3
    for key, value in ds[0]["continued"].items():
        assert torch.equal(value, ds[0]["resumed"][key]), key


def test_plugin_under_zero3_trains_like_ddp(tmp_path):
    """The custom loop of tests/scripts/ds_plugin.py under ZeRO-3 (every rank predicting its own partitions) and DDP:
    the same model and g-nets after 4 steps of gradient accumulation 2 (1e-6 of the largest value), both ranks
    equal; accelerator.save_state is refused with the reason, and plugin.save_pretrained's checkpoint loads."""
    import torch

    from hf_gb import load_compressed

    for mode in ("zero3", "ddp"):
        (tmp_path / mode).mkdir()
        torchrun("ds_plugin.py", str(tmp_path / mode), mode, env=CPU)
    ds = [torch.load(tmp_path / "zero3" / f"rank{r}.pt") for r in range(2)]
    ddp = torch.load(tmp_path / "ddp" / "rank0.pt")
    assert ds[0]["wrapped"] == "DeepSpeedEngine" and "not supported yet" in ds[0]["refused"]
    for key, value in ds[0]["state"].items():
        assert torch.equal(value, ds[1]["state"][key]), key
        error = float((value - ddp["state"][key]).abs().max() / ddp["state"][key].abs().max())
        assert error < 1e-6, (key, error)
    from test_accelerate_plugin import loop

    model = load_compressed(str(tmp_path / "zero3" / "ckpt"), model=loop.make_model(100))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ds[0]["state"]["model." + key], rtol=1e-6, atol=1e-7)


def test_check_setup_under_deepspeed():
    import types

    from hf_gb.training.distributed import check_setup

    def accelerator(stage, config=None):
        ds = types.SimpleNamespace(zero_stage=stage, hf_ds_config=types.SimpleNamespace(config=config or {}))
        return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=ds), num_processes=2)

    assert check_setup(accelerator(2), False, True, "GBPlugin") == "deepspeed"
    assert check_setup(accelerator(1), False, True, "GBTrainer") == "deepspeed"
    optimizer = {"optimizer": {"type": "AdamW"}}
    assert check_setup(accelerator(2, optimizer), False, True, "GBPlugin") == "deepspeed"  # its own DummyOptim
    with pytest.raises(NotImplementedError, match="'optimizer' section"):
        check_setup(accelerator(2, optimizer), False, True, "GBTrainer")
    assert check_setup(accelerator(3), False, True, "GBPlugin") == "deepspeed"
    assert check_setup(accelerator(3), False, True, "GBTrainer") == "deepspeed"

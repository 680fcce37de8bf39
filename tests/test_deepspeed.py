"""DeepSpeed ZeRO (hf_gb.training.deepspeed, hf_gb.training.distributed): GBTrainer at stages 1 and 2 and GBPlugin at
stage 2 train like DDP over 2 gloo processes (torchrun, DS_ACCELERATOR=cpu) and resume exactly; stage 3, stage 0 and
(for GBTrainer) a DeepSpeed optimizer section are refused at start with the reason."""

import json
import os

import pytest
from test_sharding import torchrun

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
    [({"stage": 3}, {}, "ZeRO stage 3: its parameters are flat partitions .*ZeRO stage 1 or 2"),
     ({"stage": 0}, {}, "ZeRO stage 0: stage 0 is plain data parallelism"),
     ({"stage": 2}, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "'optimizer' section")],
)
def test_unsupported_deepspeed_configs_are_refused(tmp_path, monkeypatch, zero, extra, message):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", **extra}
    args = GBTrainingArguments(str(tmp_path), report_to="none", use_cpu=True, deepspeed=config)
    with pytest.raises(NotImplementedError, match=message):
        GBTrainer(model=tiny_model(), args=args)


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
    with pytest.raises(NotImplementedError, match="GBPlugin does not support DeepSpeed ZeRO stage 3"):
        check_setup(accelerator(3), False, True, "GBPlugin")

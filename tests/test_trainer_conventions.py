"""GBTrainer where transformers' own Trainer tests look: a second trainer over the same model, auto_find_batch_size
after an out-of-memory error, resume errors in Trainer's wording, models that load their own state (a buffer that
changes shape), and a multi-process launch in which every process sees itself alone."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import ROOT, assert_states_close, gnet_state, make_args, repredicted, tiny_data, tiny_model
from torch import nn
from transformers import TrainerCallback

from hf_gb import GBConfig, GBTrainer, GenomicBottleneck
from hf_gb.files import WEIGHTS_NAME


# ----------------------------------------------------------------------------- a second trainer, the same model
def test_second_trainer_trains_the_attached_bottleneck_on(tmp_path):
    model = tiny_model()
    first = GBTrainer(model=model, args=make_args(tmp_path, "a"), train_dataset=tiny_data())
    first.train()
    after_first = gnet_state(first)
    second = GBTrainer(model=model, args=make_args(tmp_path, "b"), train_dataset=tiny_data())  # a re-run cell
    assert second.gb is first.gb
    assert_states_close(gnet_state(second), after_first)  # not re-initialised
    second.train()
    assert any(not torch.equal(v, after_first[k]) for k, v in gnet_state(second).items())
    assert_states_close(repredicted(second.gb).state_dict(), second.gb.state_dict())


def test_second_trainer_with_other_settings_names_them(tmp_path):
    model = tiny_model()
    first = GBTrainer(model=model, args=make_args(tmp_path, "a"))  # kept: the model refers to its bottleneck weakly
    with pytest.raises(ValueError, match=r"hidden_dim=8 attached, 4 asked for.*detach_model"):
        GBTrainer(model=model, args=make_args(tmp_path, "b", gb_hidden_dim=4))
    with pytest.raises(ValueError, match=r"stochastic=False attached, True asked for"):
        GBTrainer(model=model, args=make_args(tmp_path, "c"), gb_config=GBConfig(hidden_dim=8, tile_size=16,
                                                                                     stochastic=True, seed=42))
    assert first.gb.config.hidden_dim == 8


class OutOfMemory(TrainerCallback):
    """Raise the error CUDA raises when out of memory while the train batch size is at least ``limit`` (as
    transformers' tests/trainer simulate it), at the end of a step or in the middle of one (``where``)."""

    def __init__(self, limit: int, where: str):
        self.limit, self.where, self.raised = limit, where, 0

    def _maybe_raise(self, state):
        if state.train_batch_size >= self.limit:
            self.raised += 1
            raise RuntimeError("CUDA out of memory.")

    def on_step_end(self, args, state, control, **kwargs):
        if self.where == "step_end":
            self._maybe_raise(state)

    def on_substep_end(self, args, state, control, **kwargs):  # between micro-batches: weight grads are pending
        if self.where == "micro_batch":
            self._maybe_raise(state)


@pytest.mark.parametrize("where", ["step_end", "micro_batch"])
def test_auto_find_batch_size_after_out_of_memory_and_resume(tmp_path, where):
    def args(max_steps):
        return make_args(tmp_path, "out", max_steps=max_steps, save_strategy="steps", save_steps=1,
                         auto_find_batch_size=True, per_device_train_batch_size=8, gradient_accumulation_steps=2)

    oom = OutOfMemory(limit=8, where=where)
    trainer = GBTrainer(model=tiny_model(), args=args(3), train_dataset=tiny_data(64), callbacks=[oom])
    trainer.train()
    assert oom.raised == 1 and trainer._train_batch_size == 7  # transformers' 0.9 factor
    assert trainer.state.global_step == 3
    assert_states_close(repredicted(trainer.gb).state_dict(), trainer.gb.state_dict())
    for t in trainer.gb.covered:  # the weights are the g-nets' prediction, nothing of the abandoned step pending
        assert t.param.grad is None
    resumed = GBTrainer(model=tiny_model(seed=1), args=args(4), train_dataset=tiny_data(64))
    assert resumed._train_batch_size == 8
    resumed.train(resume_from_checkpoint=True)
    assert resumed._train_batch_size == 7 and resumed.state.global_step == 4


# ----------------------------------------------------------------------------- resume errors
def test_resume_from_a_folder_without_a_checkpoint_keeps_trainers_wording(tmp_path):
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path, "out"), train_dataset=tiny_data())
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"  # a plain transformers checkpoint folder
    tiny_model().save_pretrained(plain)
    cases = {tmp_path / "empty": "gb_config.json is missing", tmp_path / "nowhere": "no such folder",
             plain: "gb_config.json is missing"}
    for folder, reason in cases.items():
        with pytest.raises(ValueError) as error:
            trainer.train(resume_from_checkpoint=str(folder))
        assert str(error.value).startswith(f"Can't find a valid checkpoint at {folder}: ")
        assert reason in str(error.value)
    with pytest.raises(ValueError, match=r"^No valid checkpoint found in output directory \(.*out\): resuming needs"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


# ----------------------------------------------------------------------------- models that load their own state
class DataOrder(nn.Module):
    """transformers' test model for the data order (tests/trainer, test_resume_batch_order): a buffer that grows
    by every batch and a ``load_state_dict`` that takes the saved buffer's shape; the Linear is covered."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32, bias=False)
        self.register_buffer("data_order", torch.empty(0, dtype=torch.long))

    def load_state_dict(self, state_dict, strict=True):
        if "data_order" in state_dict and self.data_order.shape != state_dict["data_order"].shape:
            self.data_order = state_dict["data_order"].clone()
        return super().load_state_dict(state_dict, strict=strict)

    def forward(self, input_ids, labels=None):
        logits = self.fc(input_ids)
        self.data_order = torch.cat([self.data_order, input_ids[:, 0].long()])
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Recorder(nn.Module):
    """A submodule that resizes its own buffer in ``_load_from_state_dict`` (no override at the top)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("data_order", torch.empty(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "data_order")
        if saved is not None:
            self.data_order = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32, bias=False)
        self.recorder = Recorder()

    @property
    def data_order(self):
        return self.recorder.data_order

    def forward(self, input_ids, labels=None):
        logits = self.fc(input_ids)
        self.recorder.data_order = torch.cat([self.recorder.data_order, input_ids[:, 0].long()])
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Ordered(torch.utils.data.Dataset):
    def __init__(self, size: int = 10):
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randn(size, 32, generator=gen)
        self.data[:, 0] = torch.arange(size)
        self.labels = torch.randint(0, 32, (size,), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.labels[i]}


@pytest.mark.parametrize("model_class", [DataOrder, Nested], ids=["load_state_dict", "_load_from_state_dict"])
def test_checkpoint_round_trip_of_a_model_that_loads_its_own_buffer(tmp_path, model_class):
    def run(name, resume=None):
        torch.manual_seed(0)
        args = make_args(tmp_path, name, max_steps=10, save_strategy="steps", save_steps=1, seed=42,
                         per_device_train_batch_size=2, gb_tile_size=[16])
        trainer = GBTrainer(model=model_class(), args=args, train_dataset=Ordered())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    resumed = run("resumed", str(tmp_path / "full" / "checkpoint-6"))  # its buffer holds 12 entries, a new model 0
    assert torch.equal(full.model.data_order, resumed.model.data_order)
    assert len(full.model.data_order) == 20
    key = "model.data_order" if model_class is DataOrder else "model.recorder.data_order"
    assert torch.equal(load_file(str(tmp_path / "resumed" / "checkpoint-10" / WEIGHTS_NAME))[key],
                       full.model.data_order)
    assert_states_close(gnet_state(full), gnet_state(resumed), atol=1e-6)
    full.save_model(str(tmp_path / "final"))
    loaded = GenomicBottleneck.from_pretrained(str(tmp_path / "final"), model=model_class()).model
    assert torch.equal(loaded.data_order, full.model.data_order)
    torch.testing.assert_close(loaded.fc.weight, full.model.fc.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------- launched twice, alone each time
@pytest.mark.parametrize("mode", ["trainer", "plugin"])
def test_two_processes_without_use_cpu_are_refused(tmp_path, mode):
    from test_accelerate_plugin import free_port, subprocess_env

    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}  # a machine without GPUs
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "tests", "scripts", "alone.py"), mode, str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "TRAINED" not in output, output[-3000:]
    fix = "use_cpu=True (--use_cpu)" if mode == "trainer" else "cpu=True"
    for rank in (0, 1):
        line = next((line for line in output.splitlines() if line.startswith(f"REFUSED rank{rank}: ")), output[-3000:])
        assert "WORLD_SIZE=2" in line and fix in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

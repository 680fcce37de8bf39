"""GBTrainer and GBTrainingArguments on a tiny Llama (hidden 32, 2 layers, vocab 64), a few steps each."""

import concurrent.futures
import copy
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors import safe_open
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

import hf_gb
from hf_gb import GBConfig, GBTrainer, GBTrainingArguments, GenomicBottleneck
from hf_gb.files import WEIGHTS_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 64, 16


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_data(n: int = 32, seed: int = 0) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1")


def make_args(tmp_path, name: str = "out", **overrides) -> GBTrainingArguments:
    kwargs = dict(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, disable_tqdm=True,
                  per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                  max_steps=3, gb_family="mlp", gb_hidden_dim=8, gb_tile_size=[16])
    kwargs.update(overrides)
    return GBTrainingArguments(**kwargs)


def gnet_state(trainer: GBTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.gb.state_dict().items()}


def assert_states_close(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def repredicted(gb: GenomicBottleneck) -> GenomicBottleneck:
    """A copy of ``gb`` and its model whose covered weights are predicted afresh from ``gb``'s current g-nets."""
    twin = copy.deepcopy(gb)  # deep-copies the model too (a kept prediction graph is not copied)
    for t in twin.covered:
        t.param.data.zero_()
    twin.predict_weights(sample=False)
    return twin


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


# ----------------------------------------------------------------------------- the step
def test_predict_once_per_step_push_on_sync_microbatch_before_clipping(tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=1.0)
    trainer = GBTrainer(model=tiny_model(), args=args, train_dataset=tiny_data())
    gb, events = trainer.gb, []
    predict, push, step, clip = gb.predict_weights, gb.push_gradients, trainer.training_step, trainer._clip_grad_norm

    def on_predict(*a, **k):
        events.append("predict")
        return predict(*a, **k)

    def on_push():
        events.append(f"push(sync={trainer.accelerator.sync_gradients})")
        return push()

    def on_step(*a, **k):
        events.append("micro-batch")
        return step(*a, **k)

    def on_clip(model):
        # Pushed already: g-net grads exist, weight grads are consumed.
        assert all(p.grad is not None for p in gb.parameters() if p.requires_grad)
        assert all(t.param.grad is None for t in gb.covered)
        events.append("clip")
        return clip(model)

    gb.predict_weights, gb.push_gradients, trainer.training_step, trainer._clip_grad_norm = (
        on_predict, on_push, on_step, on_clip)

    class AfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # Trainer zeroes only the model's grads; the g-nets must be zeroed too (docs/design.md §2).
            assert all(p.grad is None for p in gb.parameters())
            events.append("step-end")

    trainer.add_callback(AfterStep())
    trainer.train()
    per_step = ["micro-batch", "micro-batch", "push(sync=True)", "clip", "predict", "step-end"]
    assert events == ["predict"] + per_step * 3

    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in gb.parameters()} | {id(p) for p in gb.uncompressed_parameters()}
    assert held == expected
    assert not held & {id(t.param) for t in gb.covered}
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.0  # g-nets: gb_weight_decay


def test_weights_follow_the_gnets_after_every_step(tmp_path):
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path), train_dataset=tiny_data())
    before = gnet_state(trainer)
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in gnet_state(trainer).items())
    twin = repredicted(trainer.gb)
    for mine, theirs in zip(trainer.gb.covered, twin.covered):
        torch.testing.assert_close(mine.param, theirs.param, atol=0, rtol=0, msg=mine.name)


@pytest.mark.parametrize("micro_batch,accumulation", [(4, 2), (2, 4)])
def test_gradient_accumulation_matches_large_batch(tmp_path, micro_batch, accumulation):
    def run(name, batch, steps_accum):
        model = tiny_model().double()
        gb = GenomicBottleneck(model, GBConfig(family="mlp", hidden_dim=8, tile_size=16)).double()
        args = make_args(tmp_path, name, per_device_train_batch_size=batch, gradient_accumulation_steps=steps_accum,
                         max_grad_norm=0.0, train_sampling_strategy="sequential")
        trainer = GBTrainer(model=model, gb=gb, args=args, train_dataset=tiny_data())
        trainer.train()
        return gnet_state(trainer), [p.detach().clone() for p in gb.uncompressed_parameters()]

    big, big_plain = run("big", micro_batch * accumulation, 1)
    small, small_plain = run("small", micro_batch, accumulation)
    assert_states_close(big, small, atol=1e-10)
    for a, b in zip(big_plain, small_plain):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_max_grad_norm_clips_the_gnet_gradients(tmp_path):
    max_norm = 1e-3
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path, max_grad_norm=max_norm),
                        train_dataset=tiny_data())
    seen = []

    class PreStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            gnet = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in trainer.gb.parameters() if p.requires_grad])
            )
            every = torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]))
            seen.append((gnet.item(), every.item()))

    trainer.add_callback(PreStep())
    trainer.train()
    assert len(seen) == 3
    for gnet, every in seen:
        assert 0 < gnet <= every <= max_norm * (1 + 1e-4)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == 3 and all(n > 10 * max_norm for n in logged)  # pre-clip norms, g-nets included


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_model()
    dtypes = []
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    trainer = GBTrainer(model=model, args=make_args(tmp_path, bf16=True), train_dataset=tiny_data())
    before = gnet_state(trainer)
    out = trainer.train()
    assert set(dtypes) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in gnet_state(trainer).items())


def test_user_optimizer_must_hold_the_gnets(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="g-net parameters"):
        GBTrainer(model=model, args=make_args(tmp_path), optimizers=(optimizer, None))


# ----------------------------------------------------------------------------- evaluation
def test_eval_and_compute_metrics_see_current_weights(tmp_path):
    data, eval_data = tiny_data(), tiny_data(8, seed=1)
    calls = []

    def compute_metrics(eval_pred):
        twin = repredicted(trainer.gb)
        expected = logits_of(twin.model, eval_data["input_ids"]).numpy()
        calls.append(float(abs(eval_pred.predictions - expected).max()))
        return {"gnet_sum": float(sum(p.detach().double().sum() for p in trainer.gb.parameters()))}

    args = make_args(tmp_path, eval_strategy="steps", eval_steps=1)
    trainer = GBTrainer(model=tiny_model(), args=args, train_dataset=data, eval_dataset=eval_data,
                        compute_metrics=compute_metrics)
    trainer.train()
    assert len(calls) == 3 and max(calls) < 1e-5
    sums = [h["eval_gnet_sum"] for h in trainer.state.log_history if "eval_gnet_sum" in h]
    assert len(set(sums)) == 3  # the g-nets moved between evaluations, so stale weights would have shown
    predicted = trainer.predict(eval_data).predictions
    assert abs(predicted - logits_of(trainer.model, eval_data["input_ids"]).numpy()).max() < 1e-5


@pytest.mark.parametrize("stochastic", [False, True])
def test_load_best_model_at_end_and_save_total_limit(tmp_path, stochastic):
    def compute_metrics(eval_pred):
        return {"peak": -abs(trainer.state.global_step - 2)}  # best at step 2 of 4

    args = make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                     save_steps=1, save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="peak",
                     greater_is_better=True, gb_stochastic=stochastic)
    trainer = GBTrainer(model=tiny_model(), args=args, train_dataset=tiny_data(), eval_dataset=tiny_data(8, 1),
                        compute_metrics=compute_metrics)
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]  # save_total_limit keeps the best
    with safe_open(str(out / "checkpoint-2" / WEIGHTS_NAME), framework="pt") as f:
        saved = {k[len("gnet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("gnet.")}
    assert_states_close(gnet_state(trainer), saved)
    best = hf_gb.load_compressed(str(out / "checkpoint-2"))
    ids = tiny_data(4, 2)["input_ids"]
    torch.testing.assert_close(logits_of(trainer.model, ids), logits_of(best, ids))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_and_final_save_are_compressed(tmp_path):
    tokenizer = tiny_tokenizer()
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = GBTrainer(model=tiny_model(), args=args, train_dataset=tiny_data(), processing_class=tokenizer)
    trainer.train()
    out = tmp_path / "out"
    assert os.listdir(out) == ["checkpoint-4"]
    files = set(os.listdir(out / "checkpoint-4"))
    assert {WEIGHTS_NAME, "gb_config.json", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
            "rng_state.pth", "trainer_state.json", "training_args.bin", "README.md"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}

    final = tmp_path / "final"
    trainer.save_model(str(final))
    gb = trainer.gb
    path = str(final / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    uncompressed = {n for n, p in trainer.model.named_parameters() if id(p) in {id(q) for q in
                                                                                  gb.uncompressed_parameters()}}
    assert keys == {"gnet." + k for k in gb.state_dict()} | {"model." + n for n in uncompressed}
    assert not keys & {"model." + t.name for t in gb.covered}
    assert metadata["format"] == "hf_gb" and metadata["hf_gb_version"] == hf_gb.__version__

    # Size on disk: exactly the g-net and uncompressed tensors (plus the header), as stats() counts them.
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    payload = os.path.getsize(path) - header
    stats = gb.stats()
    scales = sum(b.numel() for b in gb.buffers() if b.dtype.is_floating_point) - sum(
        b.numel() for name, b in gb.named_buffers() if name.endswith("_codes"))
    assert payload == 4 * (stats["gnet_params"] + scales + stats["uncompressed_params"])
    dense = 4 * (stats["covered_params"] + stats["uncompressed_params"])
    assert dense / payload == pytest.approx(stats["overall_compression"], rel=0.02)

    reloaded = hf_gb.load_compressed(str(final))
    ids = tiny_data(4, 2)["input_ids"]
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(trainer.model, ids), atol=0, rtol=0)
    predicted = trainer.predict(tiny_data(4, 2)).predictions
    assert abs(predicted - logits_of(reloaded, ids).numpy()).max() < 1e-5
    assert type(reloaded) is LlamaForCausalLM


@pytest.mark.parametrize("stochastic", [False, True])
def test_resume_matches_uninterrupted_run(tmp_path, stochastic):
    def args(name):
        return make_args(tmp_path, name, max_steps=4, save_strategy="steps", save_steps=2,
                         gradient_accumulation_steps=2, per_device_train_batch_size=2, gb_stochastic=stochastic)

    full = GBTrainer(model=tiny_model(), args=args("full"), train_dataset=tiny_data())
    full.train()
    resumed = GBTrainer(model=tiny_model(seed=1), args=args("resumed"), train_dataset=tiny_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert_states_close(gnet_state(full), gnet_state(resumed), atol=1e-6)
    for a, b in zip(full.gb.uncompressed_parameters(), resumed.gb.uncompressed_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_continue_training_from_a_restored_bottleneck(tmp_path):
    first = GBTrainer(model=tiny_model(), args=make_args(tmp_path, "first"), train_dataset=tiny_data())
    first.train()
    first.save_model(str(tmp_path / "saved"))
    gb = GenomicBottleneck.from_pretrained(str(tmp_path / "saved"))
    assert_states_close(gnet_state(first), {k: v.detach() for k, v in gb.state_dict().items()})
    second = GBTrainer(gb=gb, args=make_args(tmp_path, "second"), train_dataset=tiny_data())
    assert second.model is gb.model and second.gb is gb
    second.train()
    assert any(not torch.equal(v, gnet_state(first)[k]) for k, v in gnet_state(second).items())


def test_resume_rejects_a_checkpoint_of_other_gnets(tmp_path):
    first = GBTrainer(model=tiny_model(), args=make_args(tmp_path, "a", save_strategy="steps", save_steps=3),
                      train_dataset=tiny_data())
    first.train()
    other = GBTrainer(model=tiny_model(), args=make_args(tmp_path, "b", gb_hidden_dim=4), train_dataset=tiny_data())
    with pytest.raises(ValueError, match=r"hidden_dim=8.*hidden_dim=4"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_push_to_hub_uploads_the_compressed_folder(tmp_path, monkeypatch):
    import transformers.trainer

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, run_as_future=False, path_in_repo=None, **kwargs):
            uploads.append((path_in_repo, sorted(os.listdir(folder_path))))
            future = concurrent.futures.Future()
            future.set_result(None)
            return future if run_as_future else None

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True,
                     hub_model_id="me/tiny-gb", hub_strategy="checkpoint")
    trainer = GBTrainer(model=tiny_model(), args=args, train_dataset=tiny_data())
    trainer.train()
    trainer.push_to_hub()
    root_uploads = [files for where, files in uploads if where is None]
    assert len(root_uploads) == 2 and [w for w, _ in uploads if w is not None] == ["last-checkpoint"]
    for files in root_uploads:
        assert {WEIGHTS_NAME, "gb_config.json", "config.json", "README.md"} <= set(files)
        assert "model.safetensors" not in files
    with open(tmp_path / "out" / "README.md") as f:
        assert "hf_gb" in f.read()


# ----------------------------------------------------------------------------- arguments and refusals
def test_training_arguments_parse_from_cli_json_and_yaml(tmp_path):
    parser = HfArgumentParser(GBTrainingArguments)
    cli = ["--output_dir", str(tmp_path), "--gb_hidden_dim", "16", "--gb_tile_size", "32", "64",
           "--gb_target_modules", "q_proj", "v_proj", "--gb_encoding", "gray", "--gb_stochastic", "--seed", "7",
           "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(cli)
    expected = GBConfig(hidden_dim=16, tile_size=[32, 64], target_modules=["q_proj", "v_proj"], encoding="gray",
                        stochastic=True, seed=7)
    assert args.to_gb_config() == expected

    values = {"output_dir": str(tmp_path), "gb_hidden_dim": 16, "gb_tile_size": [32, 64],
              "gb_target_modules": ["q_proj", "v_proj"], "gb_encoding": "gray", "gb_stochastic": True, "seed": 7,
              "report_to": "none"}
    (tmp_path / "args.json").write_text(json.dumps(values))
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    assert parser.parse_json_file(str(tmp_path / "args.json"))[0].to_gb_config() == expected
    assert parser.parse_yaml_file(str(tmp_path / "args.yaml"))[0].to_gb_config() == expected

    (one,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--gb_tile_size", "32",
                                                 "--gb_seed", "3", "--report_to", "none"])
    assert one.to_gb_config().tile_size == [32, 32] and one.to_gb_config().seed == 3
    regex = parser.parse_dict({"output_dir": str(tmp_path), "gb_target_modules": r".*\.q_proj",
                               "report_to": "none"})[0]
    assert regex.to_gb_config().target_modules == r".*\.q_proj"
    with pytest.raises(ValueError, match="gb_.*hidden_dim=0"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--gb_hidden_dim", "0"])


def test_trainer_takes_gb_config_from_arguments_or_keyword(tmp_path):
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path, gb_hidden_dim=4, seed=5))
    assert trainer.gb.config.hidden_dim == 4 and trainer.gb.config.seed == 5
    explicit = GBConfig(hidden_dim=6, tile_size=16)
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path), gb_config=explicit)
    assert trainer.gb.config == explicit


def test_deepspeed_stages_from_the_launcher(tmp_path, monkeypatch):
    """What `accelerate launch --use_deepspeed --zero_stage N` sets: stage 3 is accepted (tests/test_deepspeed.py
    trains it), stage 0 refused with the reason."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    from accelerate.state import AcceleratorState

    try:
        trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path))
        assert trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        del trainer
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
        with pytest.raises(NotImplementedError, match="ZeRO stage 0: stage 0 is plain data parallelism"):
            GBTrainer(model=tiny_model(), args=make_args(tmp_path, "out0"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # no DeepSpeed state for the tests after this


def test_fsdp_that_does_not_engage_warns(tmp_path, monkeypatch, caplog):
    """On CPU Accelerate never enables FSDP: the run is DDP-like, and the user who asked for FSDP must hear so."""
    args = make_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with caplog.at_level(logging.WARNING, logger="hf_gb.training.distributed"):
        trainer = GBTrainer(model=tiny_model(), args=args)
    assert not trainer.is_fsdp_enabled
    assert "FSDP was requested but Accelerate did not enable it" in caplog.text


def test_fsdp1_argument_is_refused(tmp_path):
    args = make_args(tmp_path)
    args.fsdp = ["full_shard"]  # as parsed from --fsdp full_shard
    args.fsdp_config = {"version": 1}
    with pytest.raises(NotImplementedError, match="only as FSDP2 .*fsdp_version=1"):
        GBTrainer(model=tiny_model(), args=args)


# ----------------------------------------------------------------------------- two processes
def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    out, reports = tmp_path / "out", tmp_path / "reports"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_GB_DISABLE_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    script = os.path.join(ROOT, "tests", "scripts", "ddp_trainer.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), script, str(out), str(reports)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["wrapped"] == rank1["wrapped"] == "DistributedDataParallel"
    assert [s["step"] for s in rank0["steps"]] == [1, 2, 3]
    assert rank0["steps"] == rank1["steps"]  # identical g-nets and predicted weights after every step
    assert rank0["steps"][0]["gnet"] != rank0["steps"][-1]["gnet"]
    assert rank1["writes"] == []
    assert [os.path.basename(w) for w in rank0["writes"]] == ["checkpoint-2", "checkpoint-3", "final"]
    reloaded = hf_gb.load_compressed(str(out / "final"))
    assert isinstance(reloaded, LlamaForCausalLM)


# ----------------------------------------------------------------------------- examples/train.py
def load_example():
    import importlib.util

    name = "hf_gb_example_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", "train.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve the module's annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_example_byte_tokenizer_is_utf8_bytes_and_split_is_by_file():
    example = load_example()
    tokenizer = example.build_tokenizer("byte")
    text = 'def f(x):\n\treturn "héllo ☃"  # ok\r\n'
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert list(example.encode([text, "a"], tokenizer)) == [*text.encode("utf-8"), 256, ord("a"), 256]
    files = example.stdlib_files()
    train, validation = example.split_files(files, 0.05)
    assert validation and not set(train) & set(validation) and len(train) + len(validation) == len(files)
    assert example.split_files(files[::2], 0.05)[1] == [f for f in validation if f in set(files[::2])]


@pytest.mark.parametrize("mode", ["gb", "plain"])
def test_example_train_script_runs_end_to_end(tmp_path, mode):
    example = load_example()
    argv = ["--max_steps", "2", "--max_train_tokens", "8192", "--max_eval_tokens", "1024", "--hidden_size", "32",
            "--intermediate_size", "64", "--num_layers", "1", "--num_heads", "2", "--eval_strategy", "no",
            "--sample_tokens", "4", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "run")]
    results = example.main(argv + (["--no_gb"] if mode == "plain" else []))
    assert results["mode"] == mode and 0 < results["eval_loss"] < 10 and 0 <= results["accuracy"] <= 1
    files = os.listdir(results["checkpoint"])
    assert "tokenizer.json" in files
    if mode == "gb":
        assert WEIGHTS_NAME in files and "model.safetensors" not in files
        assert results["overall_compression"] > 1
        assert isinstance(hf_gb.load_compressed(results["checkpoint"]), LlamaForCausalLM)
    else:
        assert "model.safetensors" in files


def test_example_arguments_from_yaml_keep_the_embedded_defaults(tmp_path):
    example = load_example()
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 7, "gb_compression": 100, "no_gb": False, "block_size": 64}))
    script_args, training_args = example.parse_args([str(path)])
    assert training_args.max_steps == 7 and script_args.block_size == 64
    assert training_args.to_gb_config().compression == 100.0
    assert training_args.learning_rate == example.TRAINING_DEFAULTS["learning_rate"]
    assert training_args.warmup_steps == example.TRAINING_DEFAULTS["warmup_steps"] == 20
    path.write_text(yaml.safe_dump({"gb_init_active": 0.01}))
    assert example.parse_args([str(path)])[1].to_gb_config().init_active == 0.01
    path.write_text(yaml.safe_dump({"gb_init_active": None}))  # a YAML null is how a flag goes back to None
    assert example.parse_args([str(path)])[1].to_gb_config().init_active is None
    _, plain = example.parse_args(["--no_gb"])
    assert plain.output_dir == example.PLAIN_OUTPUT_DIR


def test_gb_learning_rate_sets_the_gnet_group_and_is_validated(tmp_path):
    trainer = GBTrainer(model=tiny_model(), args=make_args(tmp_path, gb_learning_rate=3e-2), train_dataset=tiny_data())
    trainer.create_optimizer()
    gnet_ids = {id(p) for p in trainer.gb.parameters()}
    lrs = {("gnet" if id(g["params"][0]) in gnet_ids else "model"): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"gnet": 3e-2, "model": 1e-2}
    with pytest.raises(ValueError, match="gb_learning_rate=0"):
        make_args(tmp_path, gb_learning_rate=0.0)


def test_frozen_model_gets_a_clear_error(tmp_path):
    model = tiny_model()
    model.requires_grad_(False)
    args = GBTrainingArguments(str(tmp_path), report_to="none", use_cpu=True, gb_hidden_dim=4, gb_tile_size=[16])
    with pytest.raises(ValueError, match="requires_grad=False.*unfreeze"):
        GBTrainer(model=model, args=args)


def test_bad_gb_argument_names_the_flag():
    from transformers import HfArgumentParser

    with pytest.raises(ValueError, match="gb_compression must be .* got gb_compression=-3"):
        HfArgumentParser(GBTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "o", "--gb_compression", "-3"])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py"), "--gb_compression", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0].endswith("got gb_compression=-3.0")

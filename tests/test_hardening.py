"""Hostile and unlucky inputs: crafted checkpoint files, kills at every write, typos, symlinks, dtype, NaN g-nets."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_gb
from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.cli import main
from hf_gb.engine.layers import name_matches, unmatched_patterns
from hf_gb.files import CONFIG_NAME, PLUGIN_STATE_NAME, STAGING_PREFIX, WEIGHTS_NAME

sys.path.insert(0, os.path.dirname(__file__))
from checkpoint_edits import edit_json  # noqa: E402

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int = 0, dtype=None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def tiny_bottleneck(seed: int = 0, **config) -> GenomicBottleneck:
    return GenomicBottleneck(tiny_model(seed), GBConfig(family="mlp", hidden_dim=8, tile_size=16, **config))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gb = tiny_bottleneck()
    folder = tmp_path_factory.mktemp("hardening") / "good"
    gb.save_pretrained(str(folder))
    return gb, folder, logits(gb.model)


def rewrite_tensors(folder, edit):
    path = str(folder / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


# ----------------------------------------------------------------------------- 1. no pickle on load_state
def test_plugin_state_is_safetensors_and_a_crafted_pickle_is_never_loaded(tmp_path):
    from accelerate import Accelerator

    from hf_gb import GBPlugin

    def setup(seed):
        accelerator = Accelerator(cpu=True)
        plugin = GBPlugin(family="mlp", hidden_dim=4, tile_size=16)
        torch.manual_seed(seed)
        model, _ = plugin.prepare(accelerator, torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)))
        optimizer = torch.optim.AdamW(plugin.trainable_parameters(), lr=1e-2)
        return accelerator, plugin, *accelerator.prepare(model, optimizer)

    accelerator, plugin, model, optimizer = setup(0)
    state = tmp_path / "state"
    accelerator.save_state(str(state))
    assert (state / PLUGIN_STATE_NAME).is_file()
    assert not [n for n in os.listdir(state) if n.startswith("custom_checkpoint")]  # nothing of ours is pickled
    saved = {k: v.clone() for k, v in plugin.bottleneck.state_dict().items()}

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(state / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(Payload(), f)
    accelerator, plugin, model, optimizer = setup(1)
    with pytest.raises(RuntimeError, match="custom checkpoints"):  # Accelerate refuses a stray pickle unread
        accelerator.load_state(str(state))
    assert not marker.exists()
    os.remove(state / "custom_checkpoint_0.pkl")
    accelerator, plugin, model, optimizer = setup(1)
    accelerator.load_state(str(state))
    assert not marker.exists()
    for k, v in plugin.bottleneck.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    os.remove(state / PLUGIN_STATE_NAME)
    with pytest.raises(FileNotFoundError, match=PLUGIN_STATE_NAME):
        accelerator.load_state(str(state))


# ----------------------------------------------------------------------------- 2/3. kills at every write
def count_replaces(monkeypatch, action) -> int:
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(b), real(a, b))[1])
    action()
    monkeypatch.undo()
    return len(calls)


def kill_at(monkeypatch, k):
    """Make the k-th os.replace (0-based) raise, as a kill at that write boundary would stop the save."""
    real, seen = os.replace, []

    def replace(a, b):
        if len(seen) == k:
            raise KeyboardInterrupt("killed")
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)


def test_a_save_over_a_checkpoint_killed_at_any_rename_loads_old_or_new_or_says_mixed(saved, tmp_path, monkeypatch):
    _, good, old_logits = saved
    new = tiny_bottleneck(seed=1)
    new_logits = logits(new.model)
    n = count_replaces(monkeypatch, lambda: new.save_pretrained(str(tmp_path / "probe")))
    assert n >= 3
    outcomes = set()
    for k in range(n + 1):
        folder = shutil.copytree(good, tmp_path / f"k{k}")
        kill_at(monkeypatch, k)
        try:
            new.save_pretrained(str(folder))
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        assert not [p for p in os.listdir(folder) if p.startswith(STAGING_PREFIX)] or k == n
        try:
            got = logits(hf_gb.load_compressed(str(folder)))
        except ValueError as e:
            assert "of two different saves" in str(e) and str(folder) in str(e)
            outcomes.add("mixed")
            continue
        if torch.equal(got, old_logits):
            outcomes.add("old")
        else:
            torch.testing.assert_close(got, new_logits, rtol=0, atol=0)
            outcomes.add("new")
    assert outcomes == {"old", "new", "mixed"}


def test_resume_true_skips_incomplete_checkpoints_without_deleting_them(tmp_path, caplog):
    from hf_gb.io.checks import last_complete_checkpoint

    gb = tiny_bottleneck()
    run = tmp_path / "run"
    for step in (2, 4):
        gb.save_pretrained(str(run / f"checkpoint-{step}"))
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-6" / f"{STAGING_PREFIX}abc").mkdir(parents=True)  # killed while staging
    gb.save_pretrained(str(run / "checkpoint-8"))  # killed before Trainer wrote trainer_state.json
    gb.save_pretrained(str(run / "checkpoint-10"))
    (run / "checkpoint-10" / "trainer_state.json").write_text("{}")
    os.remove(run / "checkpoint-10" / WEIGHTS_NAME)  # killed between the two hf_gb renames
    with caplog.at_level(logging.WARNING, logger="hf_gb.io.checks"):
        assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-4")
    for step in (6, 8, 10):
        assert f"checkpoint-{step}" in caplog.text and (run / f"checkpoint-{step}").is_dir()
    gb.save_pretrained(str(run / "checkpoint-6"))  # the next save cleans its folder's stale staging
    assert not [n for n in os.listdir(run / "checkpoint-6") if n.startswith(STAGING_PREFIX)]


def test_trainer_resume_true_uses_the_newest_complete_checkpoint(tmp_path, caplog):
    from datasets import Dataset

    from hf_gb import GBTrainer, GBTrainingArguments

    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def trainer(max_steps):
        args = GBTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                   disable_tqdm=True, per_device_train_batch_size=4, max_steps=max_steps,
                                   save_strategy="steps", save_steps=2, gb_family="mlp", gb_hidden_dim=4,
                                   gb_tile_size=[16])
        return GBTrainer(model=tiny_model(), args=args, train_dataset=data)

    trainer(4).train()
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").unlink()  # a kill before Trainer's last write
    (tmp_path / "out" / "checkpoint-2" / f"{STAGING_PREFIX}x").mkdir()  # a staging folder a kill left
    resumed = trainer(6)
    with caplog.at_level(logging.WARNING, logger="hf_gb.io.checks"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-4" in caplog.text and resumed.state.global_step == 6
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    assert not (tmp_path / "out" / "checkpoint-2" / f"{STAGING_PREFIX}x").exists()


def test_decompress_over_an_existing_folder_killed_at_any_rename_keeps_whole_files(saved, tmp_path, monkeypatch,
                                                                                    capsys):
    from transformers import AutoModelForCausalLM

    _, good, old_logits = saved
    out = tmp_path / "plain"
    assert main(["decompress", str(good), str(out)]) == 0
    other = tmp_path / "other"
    tiny_bottleneck(seed=1).save_pretrained(str(other))
    new_logits = logits(hf_gb.load_compressed(str(other)))
    before = (out / "model.safetensors").read_bytes()
    n = count_replaces(monkeypatch, lambda: main(["decompress", str(other), str(tmp_path / "probe")]))
    for k in range(n):
        kill_at(monkeypatch, k)
        assert main(["decompress", str(other), str(out)]) == 130  # the CLI reports the interrupt
        monkeypatch.undo()
        weights = (out / "model.safetensors").read_bytes()
        got = logits(AutoModelForCausalLM.from_pretrained(out))
        assert weights == before and torch.equal(got, old_logits) or torch.equal(got, new_logits)
    assert main(["decompress", str(other), str(out)]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), new_logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4/5. crafted gb_config.json
CRAFTED = [
    ("tile_size", 16.5, "tile_size"),
    ("target_modules", "(", "target_modules is not a valid regular expression"),
    ("seed", "x", "seed must be an int"),
    ("tensors", "x", "tensors must be a list"),
    ("center", None, "center must be true or false"),
    ("stochastic", "no", "stochastic must be true or false"),
    ("hidden_dim", 1048576, "hidden_dim must be an int in"),
    ("exclude_modules", "x" * 50_000_000, "at most 4096"),
    ("format_version", "1", "format_version must be a positive int"),
    ("encoding", "gray", "trained with encoding='binary'"),
    ("center", False, "trained with center=True"),
]


@pytest.mark.parametrize("field,value,message", CRAFTED, ids=[f"{f}-{str(v)[:10]}" for f, v, _ in CRAFTED])
def test_crafted_gb_config_gives_one_error_naming_file_and_field(copy_of, field, value, message, capsys):
    edit_json(copy_of / CONFIG_NAME, **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        hf_gb.load_compressed(str(copy_of))
    assert str(copy_of) in str(info.value)
    code = main(["info", str(copy_of)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err


def test_crafted_entries_recursion_and_model_configs(copy_of):
    config = copy_of / CONFIG_NAME
    good = config.read_text()
    data = json.loads(good)
    del data["tensors"][0]["shape"]
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"gb_config\.json: tensors\[0\] has no 'shape'"):
        hf_gb.load_compressed(str(copy_of))
    config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        hf_gb.load_compressed(str(copy_of))
    config.write_text(good)
    edit_json(copy_of / "config.json", architectures=["pipeline"])
    with pytest.raises(ValueError, match=r"config\.json: architectures names 'pipeline'"):
        hf_gb.load_compressed(str(copy_of))
    edit_json(copy_of / "config.json", architectures=["LlamaForCausalLM"], vocab_size=2**40)
    with pytest.raises(ValueError, match=r"config\.json.*(lacks uncompressed tensor 'model\.embed_tokens|cannot be)"):
        hf_gb.load_compressed(str(copy_of))


def test_catastrophic_patterns_and_gnet_sizes_fail_fast(copy_of):
    # A pattern that backtracks exponentially under `re` must not hang (the matcher has a time bound).
    assert not name_matches("model.layers.0.self_attn.q_proj" + "a" * 40, "([a-z_.0-9]+)+!")
    edit_json(copy_of / CONFIG_NAME, exclude_modules="([a-z_.0-9]+)+!")
    hf_gb.load_compressed(str(copy_of))  # excludes nothing, so the same model loads (and does not hang)
    edit_json(copy_of / CONFIG_NAME, exclude_modules=None, hidden_dim=60000, min_compression=1e-30)
    with pytest.raises(ValueError, match=r"hidden_dim=60000 with these tiles calls for [\d,]+ g-net values"):
        hf_gb.load_compressed(str(copy_of))


# ----------------------------------------------------------------------------- 6. silent acceptance
def test_unmatched_patterns_finds_typos():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert unmatched_patterns(names, ["q_prj", "v_proj"]) == ["q_prj"]
    assert unmatched_patterns(names, r".*\.q_proj") == []
    assert unmatched_patterns(names, r".*\.k_proj") == [r".*\.k_proj"]
    assert unmatched_patterns(names, None) == []


@pytest.mark.parametrize("field,value", [("center", None), ("stochastic", "no"), ("stochastic", 1),
                                         ("seed", "x"), ("seed", 1.0), ("init_noise", "0.1"),
                                         ("target_modules", "("), ("target_modules", "x" * 5000),
                                         ("compression", "50"), ("encoding", ["binary"])])
def test_config_types_are_strict(field, value):
    with pytest.raises(ValueError, match=f"{field}"):
        GBConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_gnet_tensors_of_another_dtype_load_with_a_warning(copy_of, dtype, caplog):
    rewrite_tensors(copy_of, lambda t: t.update({"gnet.banks.16x16x1.w2": t["gnet.banks.16x16x1.w2"].to(dtype)}))
    with caplog.at_level(logging.WARNING, logger="hf_gb.io"):
        hf_gb.load_compressed(str(copy_of))
    assert f"banks.16x16x1.w2 ({dtype} -> torch.float32)" in caplog.text


@pytest.mark.parametrize("key", ["gnet.banks.16x16x1.extra", "model.not_a_tensor", "stray"])
def test_unknown_tensors_in_the_file_are_an_error(copy_of, key):
    rewrite_tensors(copy_of, lambda t: t.update({key: torch.zeros(2)}))
    with pytest.raises(ValueError, match=re.escape(key.split(".", 1)[-1] if key != "stray" else key)):
        hf_gb.load_compressed(str(copy_of))


def test_non_finite_gnets_warn_on_save_and_on_load(tmp_path, caplog):
    gb = tiny_bottleneck()
    with torch.no_grad():
        gb.banks["16x16x1"].w2[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="hf_gb.io"):
        gb.save_pretrained(str(tmp_path / "nan"))
    assert "NaN or Inf" in caplog.text and "banks.16x16x1.w2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gb.io"):
        hf_gb.load_compressed(str(tmp_path / "nan"))
    assert "NaN or Inf" in caplog.text


# ----------------------------------------------------------------------------- 7. symlinks
def test_symlinks_are_never_followed_out_of_the_folder(saved, tmp_path, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(secret, out / "README.md")
    tiny_bottleneck().save_pretrained(str(out))
    assert not os.path.islink(out / "README.md") and "do not upload me" not in (out / "README.md").read_text()
    assert secret.read_text() == "do not upload me"

    folder = shutil.copytree(saved[1], tmp_path / "linked")
    os.symlink(secret, folder / "tokenizer.json")
    assert main(["decompress", str(folder), str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "tokenizer.json").exists()

    from hf_gb.io.hub import _skip_outside_links

    os.symlink(folder / "config.json", folder / "inside.json")
    assert _skip_outside_links(str(folder))(str(folder), os.listdir(folder)) == {"tokenizer.json"}


# ----------------------------------------------------------------------------- 8. dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_round_trip(tmp_path, dtype):
    gb = GenomicBottleneck(tiny_model(dtype=dtype), GBConfig(family="mlp", hidden_dim=8, tile_size=16))
    gb.save_pretrained(str(tmp_path / "half"))
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    model = hf_gb.load_compressed(str(tmp_path / "half"))
    assert {p.dtype for p in model.parameters()} == {dtype}
    torch.testing.assert_close(logits(model), logits(gb.model), rtol=0, atol=0)
    assert next(hf_gb.load_compressed(str(tmp_path / "half"), dtype=torch.float32).parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- 15/16. the CLI
def test_compress_refuses_to_overwrite_or_write_into_the_model(saved, tmp_path, capsys):
    model_dir = tmp_path / "llama"
    tiny_model().save_pretrained(model_dir)
    flags = ["--compression", "3", "--hidden-dim", "4", "--steps", "1", "--quiet"]
    assert main(["compress", str(model_dir), str(model_dir), *flags]) == 1
    assert "model's own folder" in capsys.readouterr().err
    out = shutil.copytree(saved[1], tmp_path / "existing")
    before = (out / WEIGHTS_NAME).read_bytes()
    assert main(["compress", str(model_dir), str(out), *flags]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / WEIGHTS_NAME).read_bytes() == before
    assert main(["compress", str(model_dir), str(out), *flags, "--overwrite"]) == 0
    assert (out / WEIGHTS_NAME).read_bytes() != before


def test_info_reports_training_state_apart_and_help_shows_defaults(copy_of, capsys):
    capsys.readouterr()
    assert main(["info", str(copy_of)]) == 0
    plain = capsys.readouterr().out
    (copy_of / "optimizer.pt").write_bytes(b"\0" * 1_000_000)
    (copy_of / "trainer_state.json").write_text("{}")
    assert main(["info", str(copy_of)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("bytes on disk"))
    assert line == next(x for x in plain.splitlines() if x.startswith("bytes on disk"))  # same model bytes
    assert "training state: 1,000,002 bytes" in out
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 500)" in help_text and "(default: 32)" in help_text and "--overwrite" in help_text


# ----------------------------------------------------------------------------- 5. fuzz of gb_config.json
def test_fuzzed_gb_config_loads_the_same_model_or_fails_naming_the_file(saved, tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis", reason="the test extra installs hypothesis")
    st = hypothesis.strategies
    _, good, expected = saved
    original = json.loads((good / CONFIG_NAME).read_text())
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6), inner, max_size=4), max_leaves=12)
    keys = st.sampled_from(sorted(original) + ["made_up"])
    entry_keys = st.sampled_from(["name", "shape", "tile", "n_tiles", "layout", "module_type"])
    edit = st.one_of(
        st.tuples(st.just("set"), keys, values),
        st.tuples(st.just("delete"), keys, st.none()),
        st.tuples(st.just("entry"), entry_keys, values),
        st.tuples(st.just("whole"), st.none(), values),
    )

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(edits=st.lists(edit, min_size=1, max_size=3))
    def check(edits):
        folder = tmp_path_factory.mktemp("fuzz")
        for name in (CONFIG_NAME, WEIGHTS_NAME, "config.json"):
            shutil.copy(good / name, folder / name)
        data = json.loads(json.dumps(original))
        for kind, key, value in edits:
            if kind != "whole" and not isinstance(data, dict):
                continue
            if kind == "set":
                data[key] = value
            elif kind == "delete":
                data.pop(key, None)
            elif kind == "entry" and isinstance(data.get("tensors"), list) and data["tensors"] \
                    and isinstance(data["tensors"][0], dict):
                data["tensors"][0][key] = value
            elif kind == "whole":
                data = value
        (folder / CONFIG_NAME).write_text(json.dumps(data))
        try:
            model = hf_gb.load_compressed(str(folder))
        except (ValueError, FileNotFoundError) as e:
            assert str(folder) in str(e), f"{type(e).__name__} without the file: {e}"
            return
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0, msg=lambda m: f"{data}: {m}")

    check()


def test_a_killed_save_over_a_format_1_checkpoint_is_detected(copy_of):
    """A format-1 weights file (no save id) beside a newer gb_config.json (with one) is a mix, not a format-1 pair."""
    path = copy_of / WEIGHTS_NAME
    save_file(load_file(str(path)), str(path), metadata={"format": "hf_gb", "format_version": "1"})
    with pytest.raises(ValueError, match="of two different saves"):
        hf_gb.load_compressed(str(copy_of))
    edit_json(copy_of / CONFIG_NAME, format_version=1, save_id=None)  # a true format-1 pair has no ids at all
    hf_gb.load_compressed(str(copy_of))


def test_training_argument_help_says_what_none_means_without_contradicting_defaults(capsys):
    from transformers import HfArgumentParser

    from hf_gb import GBTrainingArguments

    HfArgumentParser(GBTrainingArguments).print_help()
    text = " ".join(capsys.readouterr().out.split())
    compression = text[text.index("--gb_compression GB_COMPRESSION,"):][:400]
    assert "None: the tiles of `tile_size`" in compression
    rate = text[text.index("--gb_learning_rate GB_LEARNING_RATE,"):][:400]
    assert "None: the same as `learning_rate`" in rate and "(default: `learning_rate`)" not in rate

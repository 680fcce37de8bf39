"""Push and load compressed checkpoints with the real huggingface_hub client against tests/hub_server.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import hf_gb  # noqa: E402
from hf_gb import GBConfig, GenomicBottleneck  # noqa: E402
from hf_gb.files import WEIGHTS_NAME  # noqa: E402
from hf_gb.io.hub import push_folder  # noqa: E402
from hf_gb.io.model_card import load_card  # noqa: E402


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub that this process's huggingface_hub client talks to for the duration of the test."""
    with HubServer() as server:
        point_client_at(monkeypatch, server, str(tmp_path / "hub-cache"))
        yield server


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


INPUT = torch.tensor([[1, 5, 9, 3, 7, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def make_gb(seed: int = 0) -> GenomicBottleneck:
    return GenomicBottleneck(tiny_lm(seed), GBConfig(hidden_dim=4, tile_size=16, seed=seed))


def test_pushed_files_arrive_byte_identical_and_load_with_equal_logits(hub, tmp_path):
    gb = make_gb()
    folder = gb.save_pretrained(str(tmp_path / "ckpt"))
    torch.save({"state": 1}, os.path.join(folder, "optimizer.pt"))  # training state must stay local
    push_folder(folder, "tester/tiny-gb")

    remote = hub.files("tester/tiny-gb")
    local = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n != "optimizer.pt"}
    assert set(remote) == set(local)
    for name in local:
        if name != "README.md":
            assert remote[name] == local[name], name
    readme = remote["README.md"].decode()
    assert 'load_compressed("tester/tiny-gb")' in readme and folder not in readme

    model = hf_gb.load_compressed("tester/tiny-gb", cache_dir=str(tmp_path / "cache"))
    assert type(model).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(logits(model), logits(gb.model), rtol=0, atol=0)


def test_gb_push_to_hub_updates_the_repos_readme(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/with-card")
    user_readme = "---\nlicense: apache-2.0\ntags:\n- mine\n---\n# Mine\n\nWords the owner wrote.\n"
    api.upload_file(path_or_fileobj=user_readme.encode(), path_in_repo="README.md", repo_id="tester/with-card")

    gb = make_gb()
    gb.push_to_hub("tester/with-card")
    readme = hub.files("tester/with-card")["README.md"].decode()
    assert "Words the owner wrote." in readme
    assert 'load_compressed("tester/with-card")' in readme
    path = tmp_path / "README.md"
    path.write_text(readme)
    card = load_card(str(path))
    assert card.data.license == "apache-2.0"
    assert {"mine", "genomic-bottleneck"} <= set(card.data.tags)

    gb.push_to_hub("tester/with-card")  # a second push replaces our section instead of adding one
    readme = hub.files("tester/with-card")["README.md"].decode()
    assert readme.count("<!-- hf_gb:model-card:start -->") == 1 and "Words the owner wrote." in readme


def test_revisions_are_honoured(hub, tmp_path):
    first, second = make_gb(seed=0), make_gb(seed=1)
    assert not torch.equal(logits(first.model), logits(second.model))
    first.push_to_hub("tester/revs")
    first_commit = hub.commits("tester/revs")[-1]
    second.push_to_hub("tester/revs")
    second.push_to_hub("tester/revs", revision="dev")
    first.push_to_hub("tester/revs", revision="dev")  # dev now differs from main

    cache = str(tmp_path / "cache")
    served = len(hub.requests)
    by_commit = hf_gb.load_compressed("tester/revs", revision=first_commit, cache_dir=cache, token="hf_reader")
    assert set(hub.authorizations[served:]) == {"Bearer hf_reader"}  # the token reaches every download request
    torch.testing.assert_close(logits(by_commit), logits(first.model), rtol=0, atol=0)
    head = hf_gb.load_compressed("tester/revs", cache_dir=cache)
    torch.testing.assert_close(logits(head), logits(second.model), rtol=0, atol=0)
    dev = hf_gb.load_compressed("tester/revs", revision="dev", cache_dir=cache)
    torch.testing.assert_close(logits(dev), logits(first.model), rtol=0, atol=0)


def test_cache_serves_offline_loads_and_errors_are_clear(hub, tmp_path):
    gb = make_gb()
    gb.push_to_hub("tester/cached")
    cache = str(tmp_path / "cache")
    hf_gb.load_compressed("tester/cached", cache_dir=cache)
    served = len(hub.requests)
    offline = hf_gb.load_compressed("tester/cached", cache_dir=cache, local_files_only=True)
    assert len(hub.requests) == served  # not a single request: the snapshot came from the cache
    torch.testing.assert_close(logits(offline), logits(gb.model), rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="tester/absent"):
        hf_gb.load_compressed("tester/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="no such revision"):
        hf_gb.load_compressed("tester/cached", revision="nope", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="neither in the cache"):
        hf_gb.load_compressed("tester/never-downloaded", cache_dir=cache, local_files_only=True)


def test_push_folder_refuses_a_folder_that_is_not_a_checkpoint(hub, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        push_folder(str(tmp_path / "plain"), "tester/plain")
    assert "tester/plain" not in hub.repos


def test_push_folder_never_follows_links_out_of_the_folder(hub, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    folder = make_gb().save_pretrained(str(tmp_path / "ckpt"))
    os.symlink(secret, os.path.join(folder, "tokenizer.json"))
    os.symlink(os.path.join(folder, "config.json"), os.path.join(folder, "alias.json"))  # inside: fine
    push_folder(folder, "tester/links")
    remote = hub.files("tester/links")
    assert "tokenizer.json" not in remote and b"private" not in b"".join(remote.values())
    assert remote["alias.json"] == open(os.path.join(folder, "config.json"), "rb").read()
    assert secret.read_text() == "private"


# ----------------------------------------------------------------------------- GBTrainer(push_to_hub=True)
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def tiny_data():
    from datasets import Dataset

    ids = torch.randint(0, 48, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


USER_README = "---\nlicense: mit\n---\n# Trained by me\n\nNotes the owner keeps.\n"


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_trainer_pushes_compressed_files_for_every_hub_strategy(strategy, hub, tmp_path):
    from hf_gb import GBTrainer, GBTrainingArguments

    repo = f"tester/trained-{strategy.replace('_', '-')}"
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(USER_README)
    args = GBTrainingArguments(
        output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4,
        learning_rate=1e-2, max_steps=4, save_strategy="steps", save_steps=2, gb_hidden_dim=4, gb_tile_size=[16],
        push_to_hub=True, hub_model_id=repo, hub_strategy=strategy, hub_always_push=True,
    )
    trainer = GBTrainer(model=tiny_llama(), args=args, train_dataset=tiny_data())
    trainer.train()
    trainer._finish_current_push()
    during = hub.files(repo)
    if strategy == "end":
        assert during == {}  # nothing is pushed before save_model / push_to_hub
    else:
        assert {WEIGHTS_NAME, "gb_config.json", "config.json", "README.md"} <= set(during)
    trainer.push_to_hub()

    remote = hub.files(repo)
    assert not any(p.endswith(("model.safetensors", "pytorch_model.bin")) and "gb_" not in p for p in remote), remote
    assert remote[WEIGHTS_NAME] == (out / WEIGHTS_NAME).read_bytes()
    readme = remote["README.md"].decode()
    assert "Notes the owner keeps." in readme and f'load_compressed("{repo}")' in readme
    assert (out / "README.md").read_text().count("Notes the owner keeps.") == 1  # updated, not overwritten
    (tmp_path / "card.md").write_bytes(remote["README.md"])
    card = load_card(str(tmp_path / "card.md"))
    assert card.data.license == "mit" and "genomic-bottleneck" in card.data.tags

    checkpoints = sorted({p.split("/")[0] for p in remote if "/" in p})
    expected = {"end": [], "every_save": [], "checkpoint": ["last-checkpoint"],
                "all_checkpoints": ["checkpoint-2", "checkpoint-4"]}[strategy]
    assert checkpoints == expected
    for folder in checkpoints:  # resumable: the compressed files and the optimizer state of that step
        local = out / ("checkpoint-4" if folder == "last-checkpoint" else folder)
        assert remote[f"{folder}/{WEIGHTS_NAME}"] == (local / WEIGHTS_NAME).read_bytes()
        assert f"{folder}/optimizer.pt" in remote

    cache = str(tmp_path / "cache")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    model = hf_gb.load_compressed(repo, cache_dir=cache)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.model.eval()(ids).logits)
    if strategy == "checkpoint":
        resumed = hf_gb.load_compressed(repo, subfolder="last-checkpoint", cache_dir=cache)
        with torch.no_grad():
            torch.testing.assert_close(resumed(ids).logits, model(ids).logits)

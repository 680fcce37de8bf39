"""Compressed checkpoints: round trip, and every kind of bad input failing with an error that names what is wrong."""

import os
import re
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_gb
from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.files import WEIGHTS_NAME

sys.path.insert(0, os.path.dirname(__file__))
from checkpoint_edits import edit_json  # noqa: E402


def tiny_bottleneck(seed: int = 0, **gb_config) -> GenomicBottleneck:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    gb_config = {"family": "mlp", "hidden_dim": 8, "tile_size": 16, **gb_config}
    return GenomicBottleneck(LlamaForCausalLM(config), GBConfig(**gb_config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gb = tiny_bottleneck()
    folder = tmp_path_factory.mktemp("ckpt") / "good"
    gb.save_pretrained(str(folder))
    return gb, folder


def test_round_trip_gives_the_same_logits(saved):
    gb, folder = saved
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    gb.model.eval()
    reloaded = hf_gb.load_compressed(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gb.model(ids).logits, atol=0, rtol=0)


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        hf_gb.load_compressed(str(missing))


def test_folder_without_weights(copy_of):
    os.remove(copy_of / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(copy_of))}.*{WEIGHTS_NAME} is missing"):
        hf_gb.load_compressed(str(copy_of))


@pytest.mark.parametrize("damage", ["truncated", "corrupted header", "empty"])
def test_damaged_safetensors_names_the_file(copy_of, damage):
    path = copy_of / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupted header":
        data[8:40] = b"#" * 32
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is corrupt or truncated"):
        hf_gb.load_compressed(str(copy_of))


def test_gb_config_from_a_newer_format_version(copy_of):
    edit_json(copy_of / "gb_config.json", format_version=99)
    where = re.escape(str(copy_of / "gb_config.json"))
    with pytest.raises(ValueError, match=f"{where} has format_version=99.*upgrade hf_gb"):
        hf_gb.load_compressed(str(copy_of))


def test_safetensors_from_a_newer_format_version(copy_of):
    path = copy_of / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} has format_version=99"):
        hf_gb.load_compressed(str(copy_of))


def test_gb_config_disagreeing_with_the_gnet_tensors(copy_of):
    edit_json(copy_of / "gb_config.json", hidden_dim=4)  # the file's g-nets have hidden_dim 8
    pattern = r"g-net tensor 'banks\.16x16x1\.w_row'.*gb_model\.safetensors holds shape \(88, 4, 8\).*\(88, 4, 4\)"
    with pytest.raises(ValueError, match=pattern):
        hf_gb.load_compressed(str(copy_of))


def test_model_config_disagreeing_with_the_covered_tensors(copy_of):
    edit_json(copy_of / "config.json", intermediate_size=48)
    pattern = r"tensor model\.layers\.0\.mlp\.gate_proj\.weight: shape in \S*gb_config\.json is \[64, 32\].*\[48, 32\]"
    with pytest.raises(ValueError, match=pattern):
        hf_gb.load_compressed(str(copy_of))


def test_uncompressed_tensor_of_the_wrong_shape(copy_of):
    path = copy_of / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["model.model.norm.weight"] = torch.ones(31)
    save_file(tensors, str(path), metadata=metadata)
    pattern = r"tensor 'model\.norm\.weight':.*holds shape \(31,\), this model needs \(32,\)"
    with pytest.raises(ValueError, match=pattern):
        hf_gb.load_compressed(str(copy_of))


def test_interrupted_save_keeps_the_old_checkpoint(copy_of, monkeypatch):
    before = {name: (copy_of / name).read_bytes() for name in os.listdir(copy_of)}
    gb = tiny_bottleneck(seed=1)  # different weights: a completed save would change the files

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        gb.save_pretrained(str(copy_of))
    monkeypatch.undo()
    after = {name: (copy_of / name).read_bytes() for name in os.listdir(copy_of)}
    assert after == before  # no staging folder left behind, no file replaced
    hf_gb.load_compressed(str(copy_of))


def test_format_1_checkpoint_with_frozen_b2_still_loads(saved, copy_of):
    """Format 1 stored a frozen, always-zero b2 per centred bank; format 2 stores none. Both load, same logits."""
    gb, _ = saved
    path = copy_of / WEIGHTS_NAME
    tensors = load_file(str(path))
    assert not any(k.endswith(".b2") for k in tensors)
    for key in [k[: -len(".w2")] for k in tensors if k.endswith(".w2")]:
        tensors[key + ".b2"] = torch.zeros(tensors[key + ".w2"].shape[0])
    save_file(tensors, str(path), metadata={"format": "hf_gb", "format_version": "1", "hf_gb_version": "0.1.0"})
    edit_json(copy_of / "gb_config.json", format_version=1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    gb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_gb.load_compressed(str(copy_of))(ids).logits, gb.model(ids).logits)

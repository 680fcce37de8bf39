"""Checkpoints written by earlier hf_gb versions keep loading, to the same logits: the checkpoint format is a contract.

``tests/fixtures/hf_gb-0.1.0/`` holds checkpoints saved by hf_gb 0.1.0 (format 2) and never rewritten. Each is a
``LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))`` built after ``torch.manual_seed(0)``,
with ``GBConfig(seed=1, **CASES[name])``, trained three AdamW steps (lr 1e-2) on random tokens and saved with
``gb.save_pretrained(folder, model_card=False)``. The logits below were recorded from those files when they were
written (eager kernels; the native and compiled kernels agree to float tolerance). Never regenerate the files to
make this test pass: a failure here means checkpoints users already have would no longer load as they were saved.

``tests/fixtures/format-4/`` holds the same model saved by today's layout (hf_gb 0.1.0 after the move to format 4):
the default family on it (random sharing of every tensor, a format-3 file) and family "deep" with its own
``family_options`` (format 4), trained three AdamW steps (lr 1e-2) through ``with gb.step(optimizer):`` on random
tokens (``torch.randint(0, 48, (4, 8))`` seeded 0, 1, 2) with the eager kernels, and saved the same way; and the
default family with `input_shapes` on the MLP's input Linears, which gives them ``"coords"`` g-nets (their tensors
stored divided by 10/3, the multiplier of formats 3 and 4).
"""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import hf_gb
from hf_gb import GBConfig, GenomicBottleneck

FIXTURES = Path(__file__).parent / "fixtures"

CASES = {
    "hf_gb-0.1.0/llama_rows": dict(family="mlp", hidden_dim=4, tile_size=16, gains="rows"),
    "hf_gb-0.1.0/llama_shared": dict(hidden_dim=4, tile_size=16, family="shared", stochastic=True, center=False,
                                     gains="columns", encoding="gray"),
    "format-4/llama_auto": dict(compression=8),
    "format-4/llama_deep": dict(family="deep", hidden_dim=4, tile_size=16, family_options={"second_hidden_dim": 3}),
    "format-4/llama_coords": dict(compression=8, input_shapes={"gate_proj": [4, 8], "up_proj": [4, 8]}),
}
# name: (sum of the logits, sum of their absolute values, logits[:, -1, :6]) for INPUT_IDS
RECORDED = {
    "hf_gb-0.1.0/llama_rows": (
        0.179955, 60.356323, [[-0.168281, 0.146056, -0.334978, -0.075226, 0.198058, 0.35481],
                              [-0.029345, -0.046428, -0.051941, -0.033057, -0.084898, -0.143476]]),
    "hf_gb-0.1.0/llama_shared": (
        63.692199, 119.479868, [[-0.254142, -0.179528, -0.058809, -0.191547, -0.164407, -0.024669],
                                [0.530709, 0.421623, 0.224222, 0.325942, 0.090472, 0.069394]]),
    "format-4/llama_auto": (
        -3.539004, 74.537213, [[0.132907, 0.104348, -0.002677, -0.236737, 0.092651, 0.283562],
                               [-0.151509, -0.029232, -0.102977, -0.047287, -0.347552, 0.004896]]),
    "format-4/llama_deep": (
        -0.000001, 68.413285, [[-0.130663, -0.189509, -0.245514, -0.224238, 0.15298, 0.362956],
                               [0.027231, -0.129584, 0.153758, 0.089352, 0.030113, -0.110599]]),
    "format-4/llama_coords": (
        1.437969, 83.518826, [[0.260056, -0.094796, 0.311039, -0.16149, 0.202939, 0.412246],
                              [-0.251182, 0.030102, -0.334313, 0.067277, -0.058159, -0.250386]]),
}
# What a file of format 3 or 4 means by not naming an option: its "coords" g-nets were stored divided by 10/3.
READ_AS = {"format-4/llama_coords": {"family_options": {"lr_multiplier": 10 / 3}}}
INPUT_IDS = torch.arange(12).reshape(2, 6) * 3 % 48


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_saved_checkpoint_loads_to_the_recorded_logits(name):
    model = hf_gb.load_compressed(str(FIXTURES / name))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    with torch.no_grad():
        logits = model(INPUT_IDS).logits.double()
    total, absolute, last = RECORDED[name]
    assert logits.shape == (2, 6, 48)
    torch.testing.assert_close(logits.sum().item(), total, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.abs().sum().item(), absolute, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[:, -1, :6], torch.tensor(last, dtype=torch.float64), atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_saved_checkpoint_restores_its_bottleneck(name):
    gb = GenomicBottleneck.from_pretrained(str(FIXTURES / name))
    assert gb.config == GBConfig(seed=1, **CASES[name], **READ_AS.get(name, {}))
    assert len(gb.covered) == 8
    if "tile_size" in CASES[name]:
        assert all(t.geometry.key() == "16x16x1" for t in gb.covered)

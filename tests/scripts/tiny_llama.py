"""The model and data of the multi-process Trainer test scripts: a 2-layer Llama whose sizes (vocabulary 63,
MLP width 70) do not divide into the tiles evenly, and causal-LM rows of random token ids."""

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """The model, its initial weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=63, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def token_rows(rows: int) -> Dataset:
    """``rows`` sequences of 12 token ids (the same on every rank), labels equal to the inputs."""
    ids = torch.randint(0, 63, (rows, 12), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})

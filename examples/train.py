"""Train a small causal LM on the Python standard library's own source code through the genomic bottleneck.

The corpus is on every machine that runs Python (``sysconfig.get_paths()["stdlib"]``), so this runs offline. Files
are split into train and validation by a hash of their path; text is tokenised byte-level (default) or with a BPE
tokenizer trained on the train split by the ``tokenizers`` library. The model is a small Llama built from a config.

    python examples/train.py                        # genomic bottleneck, embedded defaults (~5 min on 2 CPU cores)
    python examples/train.py --no_gb                # the same model, trained plainly, for comparison
    python examples/train.py --gb_compression 100 --max_steps 1000 --tokenizer bpe
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --max_steps 200
    python examples/train.py my_args.yaml           # or .json: any field below or of GBTrainingArguments

Every ``--gb_*`` flag and every ``transformers.TrainingArguments`` flag works (``--help`` lists them). The data and
model builders (`build_datasets`, `build_model`) are importable: ``from examples.train import build_datasets``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    set_seed,
)

import hf_gb
from hf_gb import GBTrainer, GBTrainingArguments

EOS = "<|endoftext|>"
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}

# TrainingArguments defaults for this job; any flag, JSON or YAML value overrides them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "out/stdlib-gb",
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,  # every tensor, the hashed values of the default family included
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "max_grad_norm": 1.0,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "use_cpu": not torch.cuda.is_available(),  # CPU runs (also `accelerate launch` over gloo) need it
}
PLAIN_OUTPUT_DIR = "out/stdlib-plain"


@dataclass
class ScriptArguments:
    """Data and model of the job (the training settings are `GBTrainingArguments`)."""

    no_gb: bool = field(default=False, metadata={"help": "Train the same model plainly (a baseline) with Trainer."})
    tokenizer: str = field(default="byte", metadata={"help": "'byte' (256 bytes + EOS) or 'bpe' (trained here)."})
    bpe_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size of the BPE tokenizer."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Share of files held out for validation."})
    include_tests: bool = field(default=False, metadata={"help": "Also use the stdlib's test suites (18 MB more)."})
    max_train_tokens: int | None = field(default=None, metadata={"help": "Cap on training tokens (default all)."})
    max_eval_tokens: int = field(default=32_768, metadata={"help": "Cap on validation tokens."})
    stdlib_dir: str | None = field(default=None, metadata={"help": "Corpus root (default: this Python's stdlib)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width."})
    sample_tokens: int = field(default=120, metadata={"help": "Tokens to generate from the reloaded model (0: none)."})


# ----------------------------------------------------------------------------- data
def stdlib_files(root: str | None = None, include_tests: bool = False) -> list[str]:
    """Sorted paths (relative to ``root``) of the standard library's ``.py`` files."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, dirs, files in os.walk(root):
        parts = set(os.path.relpath(directory, root).split(os.sep))
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and (include_tests or d not in TEST_DIRS))
        if parts & SKIPPED_DIRS:
            continue
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    if not found:
        raise FileNotFoundError(f"No .py files under {root}")
    return sorted(found)


def split_files(files: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Train / validation split by a hash of each path: stable across machines and independent of the file list."""
    def bucket(path: str) -> float:
        return int(hashlib.md5(path.replace(os.sep, "/").encode()).hexdigest()[:8], 16) / 16**8

    validation = [f for f in files if bucket(f) < validation_fraction]
    train = [f for f in files if bucket(f) >= validation_fraction]
    return train, validation


def read_texts(files: list[str], root: str | None = None) -> list[str]:
    root = root or sysconfig.get_paths()["stdlib"]
    texts = []
    for f in files:
        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    return texts


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer(kind: str = "byte", texts: list[str] | None = None, vocab_size: int = 2048):
    """A ``PreTrainedTokenizerFast``: 'byte' (id = byte value, EOS = 256) or a byte-level BPE trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte":
        vocab = {c: b for b, c in bytes_to_unicode().items()}
        vocab[EOS] = 256
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    elif kind == "bpe":
        if not texts:
            raise ValueError("A BPE tokenizer needs training texts")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got tokenizer={kind!r}")
    tok.add_special_tokens([EOS])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def encode(texts: list[str], tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """One stream of token ids, files separated by EOS, cut at ``max_tokens``."""
    eos = tokenizer.eos_token_id
    byte_level = len(tokenizer) == 257  # the 'byte' tokenizer: ids are the UTF-8 bytes, no need to run it
    pieces, total = [], 0
    for text in texts:
        if byte_level:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            ids = np.asarray(tokenizer.backend_tokenizer.encode(text).ids, dtype=np.int32)
        pieces += [ids, np.asarray([eos], dtype=np.int32)]
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(pieces)
    return stream[:max_tokens] if max_tokens is not None else stream


class Blocks(torch.utils.data.Dataset):
    """Consecutive ``block_size`` windows of a token stream, as causal-LM examples (labels = inputs)."""

    def __init__(self, stream: np.ndarray, block_size: int):
        n = len(stream) // block_size
        if n == 0:
            raise ValueError(f"{len(stream)} tokens do not fill one block of {block_size}")
        self.blocks = torch.from_numpy(stream[: n * block_size].astype(np.int64)).view(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def build_datasets(args: ScriptArguments, tokenizer=None) -> tuple[Blocks, Blocks, PreTrainedTokenizerFast]:
    """(train, validation, tokenizer) from the stdlib sources, split by file."""
    files = stdlib_files(args.stdlib_dir, args.include_tests)
    train_files, validation_files = split_files(files, args.validation_fraction)
    train_texts = read_texts(train_files, args.stdlib_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(args.tokenizer, train_texts, args.bpe_vocab_size)
    train = Blocks(encode(train_texts, tokenizer, args.max_train_tokens), args.block_size)
    validation_texts = read_texts(validation_files, args.stdlib_dir)
    validation = Blocks(encode(validation_texts, tokenizer, args.max_eval_tokens), args.block_size)
    return train, validation, tokenizer


# ----------------------------------------------------------------------------- model and metrics
def build_model(args: ScriptArguments, vocab_size: int, seed: int = 0, eos_id: int | None = None) -> LlamaForCausalLM:
    """A small Llama, randomly initialised from ``seed``; ``eos_id`` defaults to the byte tokenizer's (256)."""
    eos_id = (256 if vocab_size == 257 else 0) if eos_id is None else eos_id
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)  # keep (batch, T) predictions, not (batch, T, vocab) logits


def make_compute_metrics():
    """Next-token accuracy through the `evaluate` metric shipped with hf_gb (offline)."""
    import evaluate

    from hf_gb import metrics

    metric = evaluate.load(metrics.path("accuracy"))

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = np.asarray(eval_pred.predictions)[:, :-1].reshape(-1)  # position t predicts token t + 1
        references = np.asarray(eval_pred.label_ids)[:, 1:].reshape(-1)
        keep = references != -100
        return metric.compute(predictions=predictions[keep], references=references[keep])

    return compute_metrics


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, GBTrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, GBTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as f:
            if argv[0].endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f)
        script_args, training_args = parser.parse_dict({**TRAINING_DEFAULTS, **values})
    else:
        parser.set_defaults(**TRAINING_DEFAULTS)
        try:
            script_args, training_args = parser.parse_args_into_dataclasses(argv)
        except ValueError as e:  # a value of the right type that the arguments refuse: one line, not a traceback
            parser.exit(2, f"{parser.prog}: error: {e}\nSee: python examples/train.py --help\n")
    if script_args.no_gb and training_args.output_dir == TRAINING_DEFAULTS["output_dir"]:
        training_args.output_dir = PLAIN_OUTPUT_DIR
    return script_args, training_args


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    script_args, training_args = parse_args(argv)
    set_seed(training_args.seed)
    train, validation, tokenizer = build_datasets(script_args)
    model = build_model(script_args, len(tokenizer), seed=training_args.seed, eos_id=tokenizer.eos_token_id)
    common = dict(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                  processing_class=tokenizer, compute_metrics=make_compute_metrics(),
                  preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    trainer = Trainer(**common) if script_args.no_gb else GBTrainer(**common)
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(f"stdlib corpus: {len(train) * script_args.block_size:,} training tokens, "
              f"{len(validation) * script_args.block_size:,} validation tokens ({script_args.tokenizer} tokenizer, "
              f"vocabulary {len(tokenizer)})")
        if script_args.no_gb:
            print(f"plain training (no genomic bottleneck): {model.num_parameters():,} parameters")
        else:
            print(trainer.gb.summary(per_tensor=True))

    trainer.train()
    metrics = trainer.evaluate()
    final = os.path.join(training_args.output_dir, "final")
    trainer.save_model(final)
    results = {
        "mode": "plain" if script_args.no_gb else "gb",
        "eval_loss": metrics["eval_loss"],
        "perplexity": math.exp(metrics["eval_loss"]),
        "accuracy": metrics.get("eval_accuracy"),
        "checkpoint": final,
    }
    if not script_args.no_gb:
        results["overall_compression"] = trainer.gb.stats()["overall_compression"]
    if main_process:
        unit = "byte" if script_args.tokenizer == "byte" else "token"
        print(f"\nvalidation loss {results['eval_loss']:.4f} nats/{unit} ({results['eval_loss'] / math.log(2):.3f} "
              f"bits/{unit}) | perplexity {results['perplexity']:.3f} | next-token accuracy {results['accuracy']:.3f}")
        size = folder_bytes(final)
        if script_args.no_gb:
            print(f"checkpoint: {final} ({size / 1024:,.0f} KiB of weights); load with "
                  f"LlamaForCausalLM.from_pretrained({final!r})")
        else:
            dense = 4 * (trainer.gb.stats()["covered_params"] + trainer.gb.stats()["uncompressed_params"])
            print(f"compressed checkpoint: {final} ({size / 1024:,.0f} KiB; the dense fp32 weights are "
                  f"{dense / 1024:,.0f} KiB, {results['overall_compression']:.1f}x); "
                  f"load with hf_gb.load_compressed({final!r})")
        if script_args.sample_tokens > 0:
            reloaded = LlamaForCausalLM.from_pretrained(final) if script_args.no_gb else hf_gb.load_compressed(final)
            prompt = tokenizer("def ", return_tensors="pt")
            torch.manual_seed(0)
            out = reloaded.generate(**prompt, max_new_tokens=script_args.sample_tokens, do_sample=True, top_k=20,
                                    pad_token_id=tokenizer.eos_token_id)
            print("sample from the reloaded checkpoint:\n" + tokenizer.decode(out[0]))
    return results


if __name__ == "__main__":
    main()

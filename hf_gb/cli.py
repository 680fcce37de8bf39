"""The ``hf-gb`` command: inspect, decompress, compress (by regression) and push compressed checkpoints.

Run ``hf-gb <command> --help`` for each command's options. User mistakes (a missing path, a folder that is not a
compressed checkpoint, a corrupt file, a bad flag value) print one line to stderr and exit with status 1 (2 for bad
usage); ``hf-gb --debug <command>`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .files import CONFIG_NAME, README_NAME, WEIGHTS_NAME, file_sizes, has_tokenizer, is_training_state

__all__ = ["main"]

logger = logging.getLogger(__name__)

class UserError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""


class _Formatter(argparse.HelpFormatter):
    """Help that shows each option's default, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- flag types
def _positive(kind: type, name: str, minimum: float = 0.0, inclusive: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        if not ok:
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text!r}")
        return value

    return parse


# ----------------------------------------------------------------------------- helpers
def _resolve(path_or_repo: str, args: argparse.Namespace) -> str:
    from .io.checks import check_compressed_folder
    from .io.download import resolve_checkpoint

    directory = resolve_checkpoint(path_or_repo, revision=getattr(args, "revision", None),
                                   token=getattr(args, "token", None), cache_dir=getattr(args, "cache_dir", None))
    return check_compressed_folder(directory)


def _add_hub_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="Hub branch, tag or commit (for a repo id)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--cache-dir", help="huggingface_hub cache folder")


def _reader_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], **texts: str) -> Any:
    """A subcommand that reads one compressed checkpoint, a folder or a Hub repo id (PATH_OR_REPO and the Hub
    flags); ``texts``: the parser's ``help`` and ``description``."""
    p = sub.add_parser(name, **texts)
    p.add_argument("path", metavar="PATH_OR_REPO", help="compressed checkpoint folder or Hub repo id")
    _add_hub_flags(p)
    p.set_defaults(func=func)
    return p


# ----------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from .io.model_card import dense_size
    from .io.pretrained import GenomicBottleneck

    directory = _resolve(args.path, args)
    gb = GenomicBottleneck.from_pretrained(directory)
    files = file_sizes(directory)
    training = sum(size for name, size in files if is_training_state(name))
    on_disk = sum(size for name, size in files if name != README_NAME and not is_training_state(name))
    dense, dtype = dense_size(gb)
    if args.json:
        print(json.dumps({**gb.stats(), "directory": directory, "files": dict(files), "bytes_on_disk": on_disk,
                          "training_state_bytes": training, "dense_bytes": dense}, indent=2))
        return 0
    print(f"checkpoint: {directory}  ({type(gb.model).__name__}, hidden_dim={gb.config.hidden_dim})")
    print(gb.summary(per_tensor=True))
    print()
    width = max(len(n) for n, _ in files)
    for name, size in files:
        print(f"{name:<{width}}  {size:>14,} bytes")
    print(f"bytes on disk: {on_disk:,} (the compressed model, without README.md); dense {dtype}: {dense:,} "
          f"({dense / on_disk:.2f}x larger)")
    if training:
        print(f"training state: {training:,} bytes (optimizer, scheduler, RNG and trainer state; not counted above)")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from .io.pretrained import decompress

    directory = _resolve(args.path, args)
    if os.path.isfile(args.out):
        raise UserError(f"{args.out} is a file; decompress writes a folder")
    model = decompress(directory, args.out)
    print(f"wrote a standard transformers folder ({type(model).__name__}) to {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from .compress.regression import compress_by_regression
    from .engine.config import GBConfig
    from .io.architecture import model_class_for
    from .io.checkpoint import save_compressed
    from .io.model_card import is_hub_model_id

    if not (os.path.isdir(args.model) or is_hub_model_id(args.model)):
        raise UserError(f"no model folder at {args.model}")
    if os.path.isfile(os.path.join(args.model, WEIGHTS_NAME)):
        raise UserError(f"{args.model} is already a compressed checkpoint; run `hf-gb decompress` on it first")
    if not args.overwrite:
        if os.path.isdir(args.model) and os.path.realpath(args.out) == os.path.realpath(args.model):
            raise UserError(f"OUT is the model's own folder {args.model}; choose another folder (or --overwrite)")
        existing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if os.path.exists(os.path.join(args.out, n))]
        if existing:
            raise UserError(f"{args.out} already holds a compressed checkpoint ({existing[0]}); pass --overwrite "
                            "to replace it")
    if args.distill:
        return cmd_compress_distill(args)
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model} is not a transformers model folder: {str(e).splitlines()[0]}") from e
    model = model_class_for(model_config).from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = None
    if has_tokenizer(args.model):
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("Not saving the tokenizer of %s: %s", args.model, e)
    config = GBConfig(
        hidden_dim=args.hidden_dim, compression=args.compression, tile_size=args.tile_size, seed=args.seed,
        target_modules=args.target_modules, exclude_modules=args.exclude_modules,
    )
    torch.manual_seed(args.seed)
    gb, errors = compress_by_regression(model, config, steps=args.steps, lr=args.lr, progress=not args.quiet)
    if not gb.covered:
        raise UserError(f"nothing to compress: no tensor of {args.model} is covered at compression {args.compression}")
    width = max(len(n) for n in errors)
    print(f"{'tensor':<{width}}  {'shape':>12}  {'rel. error':>10}")
    for t in gb.covered:
        print(f"{t.name:<{width}}  {'x'.join(map(str, t.param_shape)):>12}  {errors[t.name]:>10.4f}")
    mean = sum(errors.values()) / len(errors)
    print(gb.summary(per_tensor=False))
    print(f"mean relative weight error: {mean:.4f} over {len(errors)} tensors")
    base = args.base_model or (args.model if is_hub_model_id(args.model) else None)
    card = {"base_model": base, "metrics": {"mean_relative_weight_error": mean},
            "training": {"method": "regression to the original weights (hf-gb compress)", "steps": args.steps,
                         "learning_rate": args.lr}}
    save_compressed(gb, args.out, processing_class=tokenizer, model_card_kwargs=card)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"relative_errors": errors, "mean_relative_error": mean, **gb.stats()}, f, indent=2)
    print(f"wrote compressed checkpoint to {args.out}")
    return 0


def cmd_compress_distill(args: argparse.Namespace) -> int:
    """``hf-gb compress --distill``: a student of the model's architecture, distilled from it on ``--data``."""
    import tempfile

    import torch

    from .compress.data import load_texts, tokenize
    from .compress.distill import GBDistillationArguments, compress_by_distillation
    from .io.architecture import model_class_for
    from .io.checkpoint import save_compressed
    from .io.model_card import is_hub_model_id

    if args.data is None:  # the model and OUT were checked by cmd_compress
        raise UserError("--distill needs --data (a text file, a folder of text files or a saved datasets dataset)")
    from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding

    try:
        model_config = AutoConfig.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model} is not a transformers model folder with a tokenizer: "
                        f"{str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_texts, held_texts = load_texts(args.data, args.held_out_fraction)
    teacher = model_class_for(model_config).from_pretrained(args.model, dtype=torch.float32).eval()
    weights = {"distill_kl_weight": args.kl_weight, "distill_embedding_cosine_weight": args.cosine_weight,
               "distill_embedding_mse_weight": args.mse_weight, "distill_hidden_weight": args.hidden_weight}
    with tempfile.TemporaryDirectory(prefix="hf-gb-distill-") as scratch:
        training_args = GBDistillationArguments(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate,
            gb_learning_rate=args.gnet_learning_rate, lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0, save_strategy="no", report_to="none",
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, logging_strategy="no", seed=args.seed,
            remove_unused_columns=False, gb_hidden_dim=args.hidden_dim, gb_compression=args.compression,
            gb_tile_size=[args.tile_size] if args.tile_size else None, gb_target_modules=args.target_modules,
            gb_exclude_modules=args.exclude_modules, distill_init=args.init, distill_temperature=args.temperature,
            distill_regression_steps=args.regression_steps, distill_regression_lr=args.lr,
            **{k: v for k, v in weights.items() if v is not None},
        )
        trainer, before, after = compress_by_distillation(
            teacher, tokenize(train_texts, tokenizer, args.max_length), tokenize(held_texts, tokenizer,
                                                                                  args.max_length),
            training_args, data_collator=DataCollatorWithPadding(tokenizer), progress=not args.quiet,
        )
    gb = trainer.gb
    print(gb.summary(per_tensor=False))
    print(f"held-out ({len(held_texts)} texts), untrained student -> distilled: "
          + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in after))
    base = args.base_model or (args.model if is_hub_model_id(args.model) else None)
    card = {"base_model": base, "metrics": {f"held_out_{k}": v for k, v in after.items()},
            "training": {"method": f"distillation from {base or 'the original model'} (hf-gb compress --distill)",
                         "distillation_data": f"{os.path.basename(os.path.abspath(args.data))} "
                         f"({len(train_texts)} train / {len(held_texts)} held-out texts)",
                         "distillation_loss": trainer.describe_loss(),
                         "student_init": args.init, "steps": args.steps, "batch_size": args.batch_size,
                         "learning_rate": args.learning_rate, "gnet_learning_rate": args.gnet_learning_rate}}
    save_compressed(gb, args.out, processing_class=tokenizer, model_card_kwargs=card)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"held_out_before": before, "held_out_after": after, "loss_weights": trainer.loss_weights,
                       **gb.stats()}, f, indent=2)
    print(f"wrote compressed checkpoint to {args.out}")
    return 0


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation", "With --distill, the student (the model's architecture, covered weights "
                             "predicted by g-nets) is trained to reproduce the original model on --data; --steps "
                             "counts distillation steps, --lr is the regression init's learning rate.")
    g.add_argument("--distill", action="store_true", help="distil from the original model instead of regression")
    g.add_argument("--data", help="text file, folder of text files, or a dataset saved with save_to_disk")
    g.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=16, help="texts per step")
    g.add_argument("--learning-rate", type=_positive(float, "--learning-rate"), default=5e-4,
                   help="peak learning rate of the uncompressed tensors (embeddings, norms, biases)")
    g.add_argument("--gnet-learning-rate", type=_positive(float, "--gnet-learning-rate"), default=3e-3,
                   help="peak learning rate of the g-nets")
    g.add_argument("--init", choices=["regression", "scratch"], default="regression",
                   help="g-nets fitted to the weights first (--regression-steps) or calibrated only")
    g.add_argument("--regression-steps", type=_positive(int, "--regression-steps", 0, inclusive=True), default=100)
    g.add_argument("--temperature", type=_positive(float, "--temperature"), default=2.0, help="of the KL on logits")
    for flag, what in (("kl", "KL on logits (default 1 for models with logits)"),
                       ("cosine", "1 - cosine of mean-pooled embeddings (default 1 for models without logits)"),
                       ("mse", "MSE of mean-pooled embeddings (default 0)"),
                       ("hidden", "MSE of hidden states, layer by layer (default 0)")):
        g.add_argument(f"--{flag}-weight", type=_positive(float, f"--{flag}-weight", 0, inclusive=True),
                       help=f"weight of the {what}")
    g.add_argument("--max-length", type=_positive(int, "--max-length"), default=128, help="tokens per text")
    g.add_argument("--held-out-fraction", type=_positive(float, "--held-out-fraction"), default=0.05,
                   help="share of files (or lines) held out for the final score")


def cmd_push(args: argparse.Namespace) -> int:
    from .io.checks import check_compressed_folder
    from .io.hub import push_folder

    folder = check_compressed_folder(args.path)
    info = push_folder(folder, args.repo_id, commit_message=args.commit_message, private=args.private or None,
                       token=args.token, revision=args.revision, include_training_state=args.include_training_state)
    print(f"pushed {folder} to {args.repo_id}: {info.commit_url}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-gb", description="Compressed (genomic bottleneck) checkpoints: inspect, decompress, "
                     "compress by regression, push to the Hub.")
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"hf_gb {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = _reader_command(sub, "info", cmd_info, help="print the compression table of a checkpoint",
                        description="Per covered tensor: shape, tile geometry, g-net parameters and ratio; totals; "
                        "bytes on disk.")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")

    p = _reader_command(sub, "decompress", cmd_decompress, help="write a standard transformers folder",
                        description="Predict the weights and save the model with save_pretrained, so that "
                        "transformers' AutoModel.from_pretrained loads it without hf_gb.")
    p.add_argument("out", metavar="OUT", help="output folder")

    p = sub.add_parser("compress", help="compress an existing model by regression",
                       description="Fit g-nets to an existing model's weights by minimising the relative squared "
                       "error (docs/design.md §5); prints a per-tensor relative error and writes a compressed "
                       "checkpoint. "
                       "Pretrained weights look close to random: expect large errors at high compression.")
    p.add_argument("model", metavar="MODEL_DIR", help="transformers model folder (or Hub id)")
    p.add_argument("out", metavar="OUT", help="output folder for the compressed checkpoint")
    p.add_argument("--compression", type=_positive(float, "--compression", 1.0, inclusive=True), required=True,
                   help="target ratio of covered weights to g-net parameters (>= 1)")
    p.add_argument("--hidden-dim", type=_positive(int, "--hidden-dim"), default=32, help="g-net hidden width")
    p.add_argument("--tile-size", type=_positive(int, "--tile-size"), help="explicit square tile (overrides ratio)")
    p.add_argument("--steps", type=_positive(int, "--steps", 0, inclusive=True), default=500, help="Adam steps")
    p.add_argument("--lr", type=_positive(float, "--lr"), default=1e-2, help="peak learning rate (cosine decay)")
    p.add_argument("--target-modules", nargs="+", help="module name suffixes to cover (default: all Linear)")
    p.add_argument("--exclude-modules", nargs="+", help="module name suffixes never to cover")
    p.add_argument("--seed", type=int, default=0, help="seed of the g-net initialisation")
    p.add_argument("--base-model", help="Hub id of the original model, for the model card")
    p.add_argument("--report", help="also write the per-tensor errors and sizes as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a compressed checkpoint already in OUT, or write into the model's own folder")
    _add_distill_flags(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("push", help="push a compressed checkpoint folder to the Hub",
                       description="Upload the compressed files (not optimizer state) and the model card to "
                       "REPO_ID, creating the repo if needed. Needs a token with write access.")
    p.add_argument("path", metavar="PATH", help="compressed checkpoint folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. user/model-gb")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--include-training-state", action="store_true", help="also push optimizer / scheduler state")
    p.set_defaults(func=cmd_push)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-gb`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="hf-gb: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"hf-gb {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError, LookupError, ImportError) as e:
        if args.debug:
            raise
        print(f"hf-gb {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

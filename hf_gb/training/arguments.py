"""`GBTrainingArguments`: transformers' `TrainingArguments` plus every `GBConfig` field as a ``gb_*`` argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..engine.config import GBConfig
from .settings import add_config_fields, config_from, settings

__all__ = ["GBTrainingArguments"]


@dataclass
@add_config_fields(
    "gb_",
    optional=False,
    help_format="Genomic bottleneck: {help}",
    overrides={"seed": {"type": int | None, "default": None, "help": " Default: the Trainer's `seed`."}},
)
class GBTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the genomic-bottleneck settings: every `GBConfig` field, prefixed ``gb_``.

    Every field parses through ``HfArgumentParser`` from the command line, JSON or YAML like any other Trainer
    argument; `to_gb_config` builds the `GBConfig` that `GBTrainer` uses.

    Example::

        >>> from transformers import HfArgumentParser
        >>> from hf_gb import GBTrainingArguments
        >>> (args,) = HfArgumentParser(GBTrainingArguments).parse_args_into_dataclasses(
        ...     ["--output_dir", "out", "--gb_hidden_dim", "16", "--gb_compression", "50"])
        >>> args.to_gb_config().compression
        50.0
    """

    gb_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the g-net parameters; None: the same as `learning_rate`. The schedule "
            "scales it like the other groups'. g-nets often want a larger one than the model's tensors."
        },
    )
    gb_weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight decay of the g-net parameters (the uncompressed tensors use `weight_decay`). Default 0: "
            "decaying g-net parameters does not shrink the predicted weights toward zero, it bends the function "
            "the g-nets compute, and the bottleneck already regularises."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.gb_learning_rate is not None and not self.gb_learning_rate > 0:
            raise ValueError(
                f"gb_learning_rate must be a positive number, got gb_learning_rate={self.gb_learning_rate}"
            )
        self.to_gb_config()  # fail at parse time, naming the bad value

    def to_gb_config(self) -> GBConfig:
        """The `GBConfig` these arguments describe."""
        values = {s.name: getattr(self, "gb_" + s.name) for s in settings()}
        values["seed"] = self.seed if self.gb_seed is None else self.gb_seed
        try:
            return config_from(values)
        except ValueError as e:
            # GBConfig names the field first ("compression must be ..."): name the argument the user typed.
            message = str(e)
            field_name = message.split(" ", 1)[0]
            if field_name in values:
                message = message.replace(f"{field_name}=", f"gb_{field_name}=")
                message = message.replace(field_name, f"gb_{field_name}", 1)
            raise ValueError(f"Invalid training argument: {message}") from e

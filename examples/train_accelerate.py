"""Train a tiny ViT on scikit-learn's digits through the genomic bottleneck, in a plain Accelerate loop.

One process, or several with DDP (2 CPU processes over gloo work too)::

    python examples/train_accelerate.py
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py

The bottleneck's configuration can be changed at launch without editing this file, e.g.
``HF_GB_HIDDEN_DIM=16 HF_GB_COMPRESSION=4 python examples/train_accelerate.py``. The data are the 1,797 real 8x8
grey-level digit images bundled with scikit-learn (fixed 80/20 split); the model is a ViT built from its config.
The run prints the test accuracy after every epoch, saves the compressed checkpoint, reloads it with
`hf_gb.load_compressed`, and writes ``results.json`` into ``--output-dir``.
"""

import argparse
import json
import math
import os

import evaluate
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, get_cosine_schedule_with_warmup

from hf_gb import GBConfig, GBPlugin, load_compressed, metrics


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size, split across processes")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="out/accelerate_digits")
    return p.parse_args()


def digits(accelerator, batch_size):
    images, labels = load_digits(return_X_y=True)  # (1797, 64) grey levels 0..16, labels 0..9
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0  # (N, C=1, H=8, W=8) in [-1, 1]
    labels = torch.tensor(labels)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    per_process = max(1, batch_size // accelerator.num_processes)  # same global batch with any number of processes
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=per_process, shuffle=True)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=128)
    return train, test


def evaluate_accuracy(accelerator, model, loader):
    metric = evaluate.load(metrics.path("accuracy"))
    model.eval()
    with torch.no_grad():
        for pixel_values, labels in loader:
            predictions = model(pixel_values=pixel_values).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
            metric.add_batch(predictions=predictions.cpu(), references=labels.cpu())
    model.train()
    return metric.compute()["accuracy"]


def main():
    args = parse_args()
    # cpu=True on a machine without GPUs, so that `accelerate launch --multi_gpu` starts a gloo process group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    train_loader, test_loader = digits(accelerator, args.batch_size)
    test_set = test_loader.dataset

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config)
    # The patch embedding and the classifier are small and stay uncompressed. Fields not set in this call can be
    # set by HF_GB_* environment variables at launch; gb_config supplies the rest.
    plugin = GBPlugin(gb_config=GBConfig(hidden_dim=16, compression=4.0, exclude_modules=["projection", "classifier"]))
    model, gb = plugin.prepare(accelerator, model)
    if accelerator.is_main_process:
        gb.print_summary(per_tensor=True)

    optimizer = torch.optim.AdamW(plugin.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    # Counted on the loader before prepare: the prepared scheduler steps once per process per optimizer step.
    total_steps = math.ceil(len(train_loader) / args.grad_accum) * args.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, total_steps // 10, total_steps)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )

    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    progress = tqdm(total=steps_per_epoch * args.epochs, disable=not accelerator.is_local_main_process)
    accuracy = 0.0
    for epoch in range(args.epochs):
        for pixel_values, labels in train_loader:
            with accelerator.accumulate(model):
                plugin.before_step()  # g-nets -> weights on the first micro-batch of each optimizer step
                loss = model(pixel_values=pixel_values, labels=labels).loss
                accelerator.backward(loss)
                plugin.after_backward()  # weight grads -> g-net grads on the sync micro-batch
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(plugin.trainable_parameters(), 1.0)
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        plugin.update_weights()  # weights from the g-nets as they are after the last step
        accuracy = evaluate_accuracy(accelerator, model, test_loader)
        if accelerator.is_local_main_process:
            progress.write(f"epoch {epoch}: test accuracy {accuracy:.4f}")
    progress.close()

    checkpoint = os.path.join(args.output_dir, "compressed")
    plugin.save_pretrained(checkpoint)
    if accelerator.is_main_process:
        reloaded = load_compressed(checkpoint)  # a plain ViTForImageClassification, weights predicted
        x_test, y_test = test_set.tensors
        with torch.no_grad():
            reloaded_accuracy = (reloaded(pixel_values=x_test).logits.argmax(-1) == y_test).float().mean().item()
        stats = gb.stats()
        results = {
            "accuracy": accuracy,
            "reloaded_accuracy": reloaded_accuracy,
            "num_processes": accelerator.num_processes,
            "covered_compression": stats["covered_compression"],
            "overall_compression": stats["overall_compression"],
            "checkpoint": checkpoint,
        }
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results))
    accelerator.end_training()


if __name__ == "__main__":
    main()

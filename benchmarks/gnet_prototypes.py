"""Prototype g-net families outside the engine, on the digits MLP, to decide what the engine should build next.

One g-net per covered tensor (no tiles), over binary codes of the row and column index plus ``freqs`` sine/cosine
pairs of each position, with one or two hidden layers (``h1``, ``h2``; ``h2 = 0``: one layer), the first layer
separable, the predicted matrix double-centred and scaled to the layer's initial std as the engine does. Trained end
to end with plain autograd (the whole ``(out, in, h1)`` activation exists: fine for this 84k-weight MLP, not for
the engine). Stored values: g-net parameters, one scale per tensor and the MLP's biases, as a checkpoint would hold.
Same data, loop, epochs, batches and seeds as ``quality_digits.py``; uncompressed tensors at LR 1e-3.

    python benchmarks/gnet_prototypes.py '[[14, 8, 4], [23, 8, 0], [6, 3, 0]]' 20 3 1e-2

Arguments: a JSON list of [h1, h2, freqs], epochs, seeds, comma-separated g-net LRs. Prints one JSON line per
(configuration, LR).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_digits as qd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def features(n: int, bits: int, freqs: int) -> torch.Tensor:
    """(n, bits + 2 * freqs): +-1 binary bits of each index, then sin/cos of 2 pi k i / n for k = 1..freqs."""
    i = torch.arange(n)
    out = [((i[:, None] >> torch.arange(bits)) & 1).float() * 2 - 1] if bits else []
    if freqs:
        angle = 2 * math.pi * i[:, None].float() / n * torch.arange(1, freqs + 1).float()
        out += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(out, 1)


class TensorGNet(nn.Module):
    """One g-net predicting a whole (R, C) matrix."""

    def __init__(self, shape: tuple[int, int], h1: int, h2: int, freqs: int, std: float, gen: torch.Generator):
        super().__init__()
        R, C = shape
        self.register_buffer("fr", features(R, max(1, math.ceil(math.log2(R))), freqs))
        self.register_buffer("fc", features(C, max(1, math.ceil(math.log2(C))), freqs))
        fan_in = self.fr.shape[1] + self.fc.shape[1]

        def randn(*s, std):
            return nn.Parameter(torch.randn(*s, generator=gen) * std)

        self.wr = randn(self.fr.shape[1], h1, std=1 / math.sqrt(fan_in))
        self.wc = randn(self.fc.shape[1], h1, std=1 / math.sqrt(fan_in))
        self.b1 = randn(h1, std=0.1)
        if h2:
            self.w2 = randn(h1, h2, std=math.sqrt(2 / h1))  # drawn in this order: w2, b2, w3
            self.b2 = randn(h2, std=0.1)
            self.w3 = randn(h2, std=1 / math.sqrt(h2))
        else:
            self.w2, self.b2, self.w3 = None, None, randn(h1, std=1 / math.sqrt(h1))
        self.register_buffer("scale", torch.ones(()))
        with torch.no_grad():
            self.scale.fill_(std / self.raw().std())

    def raw(self) -> torch.Tensor:
        H = torch.relu((self.fr @ self.wr)[:, None] + (self.fc @ self.wc)[None] + self.b1)  # (R, C, h1)
        if self.w2 is not None:
            H = torch.relu(H @ self.w2 + self.b2)  # (R, C, h2)
        W = H @ self.w3
        return W - W.mean(0, keepdim=True) - W.mean(1, keepdim=True) + W.mean()

    def forward(self) -> torch.Tensor:
        return self.raw() * self.scale

    def stored(self) -> int:
        return sum(p.numel() for p in self.parameters()) + 1  # + the scale


class PrototypeMLP(nn.Module):
    """The digits MLP 64-256-256-10 whose three weight matrices come from `TensorGNet`s."""

    SHAPES = [(256, 64), (256, 256), (10, 256)]

    def __init__(self, h1: int, h2: int, freqs: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        base = qd.mlp()
        gen = torch.Generator().manual_seed(seed)
        self.g = nn.ModuleList(TensorGNet(s, h1, h2, freqs, float(base[2 * k].weight.detach().std()), gen)
                               for k, s in enumerate(self.SHAPES))
        self.biases = nn.ParameterList(nn.Parameter(base[2 * k].bias.detach().clone()) for k in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(3):
            x = x @ self.g[k]().t() + self.biases[k]
            if k < 2:
                x = torch.relu(x)
        return x

    def stored(self) -> int:
        return sum(g.stored() for g in self.g) + sum(b.numel() for b in self.biases)


def train(model: PrototypeMLP, data, epochs: int, gnet_lr: float, lr: float, seed: int) -> float:
    Xtr, ytr, Xte, yte = data
    opt = torch.optim.Adam([{"params": list(model.g.parameters()), "lr": gnet_lr},
                            {"params": list(model.biases.parameters()), "lr": lr}])
    steps = epochs * math.ceil(len(Xtr) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), 64):
            idx = perm[i : i + 64]
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    with torch.no_grad():
        return (model(Xte).argmax(1) == yte).float().mean().item()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    data = qd.load_data()
    configs = json.loads(argv[0])
    epochs = int(argv[1]) if len(argv) > 1 else 20
    seeds = int(argv[2]) if len(argv) > 2 else 3
    gnet_lrs = [float(x) for x in argv[3].split(",")] if len(argv) > 3 else [3e-3, 1e-2]
    for h1, h2, freqs in configs:
        for gnet_lr in gnet_lrs:
            accs, t0 = [], time.time()
            for seed in range(seeds):
                model = PrototypeMLP(h1, h2, freqs, seed)
                accs.append(train(model, data, epochs, gnet_lr, 1e-3, seed))
            print(json.dumps({"h1": h1, "h2": h2, "freqs": freqs, "gnet_lr": gnet_lr, "stored": model.stored(),
                              "accuracies": accs, "mean": sum(accs) / len(accs), "wall_s": round(time.time() - t0)}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

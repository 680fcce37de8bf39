"""Shared pieces of the issue-19 probes: seeded hashes, HashedNets weights, the prototype g-net family, counting.

Nothing here is part of the package; the probes import only the public engine API (GBConfig, GenomicBottleneck)
for the engine's reference rows.

Stored values (what a checkpoint must hold) are counted as: every learned tensor (nn.Parameter) of a weight
generator, every buffer it must keep (the per-tensor output scale: 1 value), and the dense tensors (biases,
embeddings, norms). Hash indices, signs and position codes are regenerated from (seed, shape) and are not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import torch
from torch import nn

M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded 32-bit integer hash of int64 ``x`` (values < 2**32), computed in int64 without overflow."""
    x = (x ^ ((seed * 0x9E3779B1 + 0x7F4A7C15) & M32)) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = ((x >> 16) ^ x) & M32
    return x


def hash_index(n: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket index in [0, buckets), sign +-1) of flat positions 0..n-1; the sign from an independent hash."""
    pos = torch.arange(n, dtype=torch.int64)
    idx = hash32(pos, 2 * seed + 1) % buckets
    sign = (hash32(pos, 2 * seed + 2) & 1).float() * 2 - 1
    return idx, sign


def init_std(weight: torch.Tensor) -> float:
    return float(weight.detach().std())


class HashedWeight(nn.Module):
    """HashedNets (Chen et al. 2015): ``W[i, j] = s(i, j) * v[h(i, j)]``; only ``v`` (``buckets`` values) is stored.

    ``v`` starts uniform with the layer's own init std, so W has the layer's init distribution's std."""

    def __init__(self, shape, buckets: int, seed: int, std: float, gen: torch.Generator, lr_scale: float = 1.0):
        super().__init__()
        self.shape = tuple(shape)
        n = math.prod(self.shape)
        buckets = max(1, min(int(buckets), n))
        idx, sign = hash_index(n, buckets, seed)
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        bound = math.sqrt(3) * std
        # lr_scale m: stored v' = v / m, W uses m * v' -> Adam steps in W-space are m times larger.
        self.m = lr_scale
        self.v = nn.Parameter((torch.rand(buckets, generator=gen) * 2 - 1) * bound / lr_scale)

    def stored(self) -> int:
        return self.v.numel()

    def forward(self) -> torch.Tensor:
        return (self.sign * (self.v * self.m)[self.idx]).view(self.shape)


# ----------------------------------------------------------------------------- position codes
def gray_bits(n: int, size: int | None = None) -> torch.Tensor:
    """+-1 Gray-code bits (LSB first) of 0..n-1, with enough bits for ``size`` (default n) positions."""
    size = size or n
    bits = max(1, (size - 1).bit_length())
    i = torch.arange(n)
    g = i ^ (i >> 1)
    return ((g[:, None] >> torch.arange(bits)) & 1).float() * 2 - 1


def binary_bits(n: int) -> torch.Tensor:
    bits = max(1, (n - 1).bit_length())
    i = torch.arange(n)
    return ((i[:, None] >> torch.arange(bits)) & 1).float() * 2 - 1


def fourier(n: int, pairs: int) -> torch.Tensor:
    k = torch.arange(1, pairs + 1, dtype=torch.float32)
    angle = math.pi * (torch.arange(n, dtype=torch.float32)[:, None] + 0.5) * k / n
    return torch.cat([torch.sin(angle), torch.cos(angle)], 1)


def axis_codes(kind: str, n: int, image: tuple[int, int] | None = None, pairs: int = 0) -> torch.Tensor:
    """Codes of the n positions of one tensor axis.

    ``yx``: position j of an (H, W) image read row-major -> Gray bits of y ++ Gray bits of x (++ Fourier pairs of
    each); ``gray`` / ``binary``: bits of the flat index."""
    if kind == "yx":
        H, W = image
        assert H * W == n, (H, W, n)
        y, x = torch.arange(n) // W, torch.arange(n) % W
        parts = [gray_bits(H)[y], gray_bits(W)[x]]
        if pairs:
            parts += [fourier(H, pairs)[y], fourier(W, pairs)[x]]
        return torch.cat(parts, 1)
    if kind == "gray":
        return gray_bits(n)
    if kind == "binary":
        return binary_bits(n)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- separable combine, chunked
def _fwd(A, B, w2):
    return torch.relu(A[:, None, :] + B[None]) @ w2


def _bwd(A, B, w2, g):
    pre = A[:, None, :] + B[None]
    act = (pre > 0).to(pre.dtype) * g[:, :, None]
    return act.sum(1) * w2, act.sum(0) * w2, (torch.relu(pre) * g[:, :, None]).sum((0, 1))


_compiled = {}


def _kern(name):
    """torch.compile'd forward / backward of the separable combine (inductor fuses them into loops; no
    (R, C, h) buffer). PROBE_EAGER=1 runs them eagerly."""
    if os.environ.get("PROBE_EAGER") == "1":
        return {"fwd": _fwd, "bwd": _bwd}[name]
    if name not in _compiled:
        _compiled[name] = torch.compile({"fwd": _fwd, "bwd": _bwd}[name], dynamic=False)
    return _compiled[name]


class _SepCombine(torch.autograd.Function):
    """out[i, j] = sum_k w2[k] * relu(A[i, k] + B[j, k])."""

    @staticmethod
    def forward(ctx, A, B, w2):
        ctx.save_for_backward(A, B, w2)
        return _kern("fwd")(A, B, w2)

    @staticmethod
    def backward(ctx, g):
        A, B, w2 = ctx.saved_tensors
        dA, dB, dw2 = _kern("bwd")(A, B, w2, g.contiguous())
        return dA, dB, dw2


def sep_combine(A, B, w2, budget: int = 1 << 22):
    return _SepCombine.apply(A, B, w2)


def center2(W: torch.Tensor) -> torch.Tensor:
    return W - W.mean(0, keepdim=True) - W.mean(1, keepdim=True) + W.mean()


class Scaled(nn.Module):
    """A learned tensor stored as ``p / m`` and used as ``m * stored``: Adam's step on it is m times larger."""

    def __init__(self, value: torch.Tensor, m: float):
        super().__init__()
        self.m = m
        self.p = nn.Parameter(value / m)

    def forward(self) -> torch.Tensor:
        return self.p * self.m

    def numel(self) -> int:
        return self.p.numel()


class FamilyWeight(nn.Module):
    """The prototype family: a structured separable g-net plus an optional per-weight hash term.

        A[i, :]   row features: hashed learned table  A[i, k] = s_r(i, k) * u[h_r(i, k)]  (rows without order)
                  or  code_r(i) @ Wr  (bits of i)
        B[j, :]   column features: colnet(code(j)) with code(j) per-axis Gray bits of (y, x) for a Linear reading
                  an image (colnet: Linear, or Linear-ReLU-Linear with ``col_hidden`` units), or a hashed table
        G[i, j]   = w2 . relu(A[i] + B[j] + b1)          (h units; separable: the engine's kernels can run it)
        W[i, j]   = scale * G[i, j] (double-centred if ``center``)  +  s(i, j) * v[h(i, j)]   (if hash_values > 0)

    ``gnet_init``: 'scale' (G starts at the layer's std), 'zero' (w2 = 0: W starts as the hash term alone).
    ``m``: the LR multiplier of the g-net tensors (`Scaled`); the hash values get ``hash_m``.
    """

    def __init__(self, shape, spec: dict, std: float, seed: int, gen: torch.Generator, image=None):
        super().__init__()
        R, C = shape
        self.shape = (R, C)
        h = spec["h"]
        m = spec.get("m", 1.0)
        self.center = spec.get("center", True)
        self.chunk_budget = spec.get("chunk", 1 << 22)
        # rows
        self.row_kind = spec.get("row", "hash")
        if self.row_kind == "grayhash":  # Gray bits of i through Wr, plus a hashed learned table
            self.register_buffer("r_code", axis_codes("gray", R), persistent=False)
            nb = self.r_code.shape[1]
            self.Wr = Scaled(torch.randn(nb, h, generator=gen) / math.sqrt(nb), m)
            pool = int(spec["row_pool"])
            idx, sign = hash_index(R * h, pool, seed * 7 + 101)
            self.register_buffer("r_idx", idx.view(R, h), persistent=False)
            self.register_buffer("r_sign", sign.view(R, h), persistent=False)
            self.u_r = Scaled(torch.randn(pool, generator=gen) * spec.get("row_std", 0.5), m)
        elif self.row_kind == "hash":
            pool = int(spec["row_pool"])
            idx, sign = hash_index(R * h, pool, seed * 7 + 101)
            self.register_buffer("r_idx", idx.view(R, h), persistent=False)
            self.register_buffer("r_sign", sign.view(R, h), persistent=False)
            self.u_r = Scaled(torch.randn(pool, generator=gen) * spec.get("row_std", 1.0), m)
        else:
            self.register_buffer("r_code", axis_codes(self.row_kind, R), persistent=False)
            nb = self.r_code.shape[1]
            self.Wr = Scaled(torch.randn(nb, h, generator=gen) / math.sqrt(nb), m)
        # columns
        self.col_kind = spec.get("col", "yx")
        if self.col_kind == "hash":
            pool = int(spec["col_pool"])
            idx, sign = hash_index(C * h, pool, seed * 7 + 202)
            self.register_buffer("c_idx", idx.view(C, h), persistent=False)
            self.register_buffer("c_sign", sign.view(C, h), persistent=False)
            self.u_c = Scaled(torch.randn(pool, generator=gen), m)
        else:
            code = axis_codes(self.col_kind, C, image, spec.get("pairs", 0))
            self.register_buffer("c_code", code, persistent=False)
            nb = code.shape[1]
            ch = spec.get("col_hidden", 0)
            if ch:
                self.Wc1 = Scaled(torch.randn(nb, ch, generator=gen) * math.sqrt(2 / nb), m)
                self.bc1 = Scaled(torch.randn(ch, generator=gen) * 0.1, m)
                self.Wc2 = Scaled(torch.randn(ch, h, generator=gen) / math.sqrt(ch / 2), m)
            else:
                self.Wc1, self.bc1 = None, None
                self.Wc2 = Scaled(torch.randn(nb, h, generator=gen) / math.sqrt(nb), m)
        self.b1 = Scaled(torch.randn(h, generator=gen) * spec.get("b1_std", 0.1), m)
        self.w2 = Scaled(torch.randn(h, generator=gen) / math.sqrt(h), m)
        self.register_buffer("scale", torch.ones(()))
        hv = int(spec.get("hash_values", 0))
        self.hash = HashedWeight(shape, hv, seed * 7 + 303, std, gen, spec.get("hash_m", 1.0)) if hv > 0 else None
        with torch.no_grad():
            g_std = spec.get("gnet_std", 1.0) * std
            self.scale.fill_(g_std / float(self.structured_raw().std()))
            if spec.get("gnet_init", "scale") == "zero":
                self.w2.p.zero_()

    def row_table(self):
        if self.row_kind == "grayhash":
            return self.r_code @ self.Wr() + self.r_sign * self.u_r()[self.r_idx]
        if self.row_kind == "hash":
            return self.r_sign * self.u_r()[self.r_idx]
        return self.r_code @ self.Wr()

    def col_table(self):
        if self.col_kind == "hash":
            return self.c_sign * self.u_c()[self.c_idx]
        x = self.c_code
        if self.Wc1 is not None:
            x = torch.relu(x @ self.Wc1() + self.bc1())
        return x @ self.Wc2()

    def structured_raw(self):
        A = self.row_table() + self.b1()
        B = self.col_table()
        G = sep_combine(A, B, self.w2(), self.chunk_budget)
        return center2(G) if self.center else G

    def forward(self):
        W = self.structured_raw() * self.scale
        if self.hash is not None:
            W = W + self.hash()
        return W

    def stored(self) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n + 1  # + the scale buffer

    @staticmethod
    def fixed_cost(R, C, spec, image=None) -> int:
        """Stored values of the structured part apart from the hashed pools (they are spec['row_pool'] etc.)."""
        h = spec["h"]
        n = 2 * h + 1  # b1, w2, scale
        if spec.get("row", "hash") != "hash":
            n += axis_codes("gray" if spec["row"] == "grayhash" else spec["row"], R).shape[1] * h
        if spec.get("col", "yx") != "hash":
            nb = axis_codes(spec.get("col", "yx"), C, image, spec.get("pairs", 0)).shape[1]
            ch = spec.get("col_hidden", 0)
            n += (nb * ch + ch + ch * h) if ch else nb * h
        return n


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def result_path(out_dir: str, args: argparse.Namespace, stem: str, ignore: tuple[str, ...] = ()) -> str | None:
    """Where a probe run's JSON goes: ``stem`` and a digest of its arguments (all but ``force``, ``tag`` and
    ``ignore``) in ``out_dir``; None, after saying so, if that run is already there and ``--force`` is not given."""
    key = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in ("force", "tag", *ignore)})
    digest = hashlib.md5(key.encode()).hexdigest()[:8]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{digest}.json")
    if os.path.exists(path) and not args.force:
        print("exists", path)
        return None
    return path


def save_result(path: str, row: dict) -> None:
    """Write a probe run's row to ``path`` (through a temporary file, so that a cut-short run leaves none)."""
    with open(path + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(path + ".tmp", path)

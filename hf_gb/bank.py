"""g-net banks: the g-nets of every tile of one geometry, stored as stacked tensors and run as one batched call.

A bank owns its whole math. `GNetBank` is the interface every g-net family implements and the one code path
they share: ``predict`` (no graph to the weights, centring, output scale and noise applied), ``push`` (the chain
rule from a tile gradient into the bank's own parameters), ``forward`` (the differentiable prediction) and
``calibrate``. A family supplies four pieces: ``tables`` (small differentiable tensors from which the tiles
follow), ``evaluate`` and ``evaluate_backward`` (the fused kernels) and ``reference`` (an unfused twin for tests);
optionally ``table_backward`` (closed-form parameter gradients) and the in-place rows route (``writes_rows``,
``evaluate_into``, ``evaluate_backward_from``). The families themselves live in `hf_gb.families`.

Every method takes ``index``, the tiles to compute (a LongTensor, or None for all): a rank that holds only some
rows of a weight predicts just the tiles that intersect them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .kernels import center_tiles, center_tiles_
from .kernels import kernel_path as _kernel_path
from .tiling import TileGeometry, TileRows, code_width, position_codes

# Positions per tile sampled to set the biases of GBConfig.init_active (all of them in smaller tiles).
SPARSE_SAMPLE = 1024

if TYPE_CHECKING:
    from .config import GBConfig

Tables = tuple[torch.Tensor, ...]

_FAMILIES: dict[str, type[GNetBank]] = {}


def register_family(cls: type[GNetBank]) -> type[GNetBank]:
    """Register a `GNetBank` subclass under ``cls.family`` (usable as a decorator); duplicates raise."""
    name = getattr(cls, "family", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `family`")
    if name in _FAMILIES and _FAMILIES[name] is not cls:
        raise ValueError(f"g-net family {name!r} is already registered by {_FAMILIES[name].__name__}")
    _FAMILIES[name] = cls
    return cls


def family_class(name: str) -> type[GNetBank]:
    """The bank class of a registered family, with an error that lists the known ones."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown g-net family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def families() -> list[str]:
    return sorted(_FAMILIES)


class GNetBank(nn.Module):
    """``n_tiles`` g-nets over tiles of one `TileGeometry`: the interface of every family and their shared code.

    The prediction of tile ``t`` is ``center(raw_t) * scale[t] + sigma_t * noise`` where ``raw`` is the family's
    function of the tile's positions, ``center`` the optional double centring (`hf_gb.kernels.center_tiles`) and
    ``sigma_t = init_noise * scale[t] * exp(log_sigma[t])`` the learned noise of stochastic banks. The scale is
    a buffer (saved, moved by ``.to()``) that `calibrate` sets to the layer's own initial std.
    """

    family: ClassVar[str]

    def __init__(self, geometry: TileGeometry, n_tiles: int, config: GBConfig, generator: torch.Generator):
        super().__init__()
        self.geometry = geometry
        self.n_tiles = n_tiles
        self.center = config.center
        self.kernel = config.kernel
        self.init_noise = config.init_noise
        self.log_sigma = nn.Parameter(torch.zeros(n_tiles)) if config.stochastic else None
        self.register_buffer("scale", torch.ones(n_tiles))  # per-tile output scale, saved with the g-nets
        self._saved: tuple[Tables, torch.Tensor | None, int | None] | None = None  # what push needs

    # ----------------------------------------------------------------- what a family implements
    def tables(self, index: torch.Tensor | None = None) -> Tables:
        """Small differentiable tensors (graph to the parameters) giving tiles ``index``, with the scale folded in."""
        raise NotImplementedError

    def evaluate(self, tables: Tables) -> torch.Tensor:
        """The raw tiles ``(n_sel, rows, cols * K)`` of detached ``tables``, by the fused kernels (no graph)."""
        raise NotImplementedError

    def evaluate_backward(self, tables: Tables, grad: torch.Tensor) -> Tables:
        """Gradients of ``sum(grad * evaluate(tables))`` with respect to each of ``tables`` (detached)."""
        raise NotImplementedError

    def reference(self, tables: Tables) -> torch.Tensor:
        """Unfused differentiable twin of `evaluate`, for tests."""
        raise NotImplementedError

    def evaluate_centered(self, tables: Tables) -> torch.Tensor:
        """`evaluate`, double-centred (`hf_gb.kernels.center_tiles`); a family may fuse the two."""
        return center_tiles_(self.evaluate(tables))

    def writes_rows(self) -> bool:
        """Optional: whether `evaluate_into` and `evaluate_backward_from` run here (kernels that address the
        weights' rows themselves, so no tile-shaped copy of the weights or their gradient is made)."""
        return False

    def evaluate_into(self, tables: Tables, rows: TileRows) -> None:
        """Optional: `evaluate` (centred if the bank is) written straight into the weight rows ``rows``."""
        raise NotImplementedError

    def evaluate_backward_from(self, tables: Tables, rows: TileRows) -> Tables:
        """Optional: `evaluate_backward` of the gradient read from the weight-gradient rows ``rows`` (centred here
        if the bank is; ``rows`` is not modified)."""
        raise NotImplementedError

    @classmethod
    def tile_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        """Stored values per tile of ``geometry`` (what compression ratios and tile choice count)."""
        raise NotImplementedError

    @classmethod
    def bank_params(cls, geometry: TileGeometry, config: GBConfig) -> float:
        """Stored values per bank of ``geometry``, shared by all its tiles, whatever their number (0: a family
        whose g-nets are all per tile). A bank of ``n`` tiles stores ``n * params_per_tile + bank_params``."""
        return 0

    def table_backward(
        self, index: torch.Tensor | None, table_grads: Tables
    ) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
        """Optional: ``(parameter, gradient)`` pairs from the gradients of ``tables(index)``, in closed form (the
        gradient of a parameter may cover only tiles ``index``: rows ``index`` of it, zeros elsewhere). The default,
        None, differentiates `tables` by autograd instead. A family that overrides it returns the pairs on every
        call: `predict` then builds its tables without a graph."""
        return None

    @property
    def _closed_form(self) -> bool:
        return type(self).table_backward is not GNetBank.table_backward

    # ----------------------------------------------------------------- shared by every family
    @classmethod
    def params_per_tile(cls, geometry: TileGeometry, config: GBConfig) -> float:
        """Parameters per tile: the family's, plus the learned noise scale of stochastic banks."""
        return cls.tile_params(geometry, config) + (1 if config.stochastic else 0)

    @classmethod
    def params_per_tile_of(cls, geometry: TileGeometry, config: GBConfig, n_tiles: int) -> float:
        """Stored values per tile of a bank of ``n_tiles`` tiles: `params_per_tile` plus `bank_params` spread over
        them (exactly `params_per_tile` for families without shared values).

        The tile choice and ``min_compression`` count each tensor with its own ``n_tiles``, as if it had its bank
        to itself: where other tensors share the bank (same tile geometry), the shared values are counted once per
        tensor there, so the compression they expect is a lower bound of what `GenomicBottleneck.stats` reports.
        """
        return cls.params_per_tile(geometry, config) + cls.bank_params(geometry, config) / n_tiles

    def num_gnet_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compiled(self) -> bool:
        """Whether this bank runs built kernels, compiled or native (`GBConfig.kernel`, bank size, availability)."""
        return self.kernel_path() != "eager"

    def kernel_path(self) -> str:
        """The kernels this bank runs on its parameters' device and dtype: 'native', 'compiled' or 'eager'."""
        p = next(self.parameters())
        return _kernel_path(self.kernel, self.n_tiles * self.geometry.numel, p.device, p.dtype)

    def _rows(self, index: torch.Tensor | None) -> int:
        return self.n_tiles if index is None else index.numel()

    def sigma(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Noise std per tile ``(n_sel,)``, differentiable in ``log_sigma``."""
        sigma = self.init_noise * self.scale * self.log_sigma.exp()
        return sigma if index is None else sigma[index]

    def noise(self, seed: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal noise of tiles ``index`` for ``seed``: the same values whichever tiles are asked for."""
        g = self.geometry
        device = self.scale.device
        gen = torch.Generator(device=device).manual_seed(seed)
        eps = torch.randn(self.n_tiles, g.rows, g.cols * g.kernel, generator=gen, device=device,
                          dtype=self.scale.dtype)
        return eps if index is None else eps[index]

    def predict(
        self, index: torch.Tensor | None = None, noise_seed: int | None = None, keep_graph: bool = True
    ) -> torch.Tensor:
        """Predicted tiles ``(n_sel, rows, cols * K)``, detached; ``noise_seed`` adds the learned noise.

        With ``keep_graph`` the bank keeps the small tables (and their graph to its parameters) for one `push`.
        """
        if noise_seed is not None and self.log_sigma is None:
            raise ValueError("noise_seed given to a bank without learned noise (GBConfig.stochastic=False)")
        tables = self._tables_for_push(index)
        with torch.no_grad():
            detached = tuple(t.detach() for t in tables)
            out = self.evaluate_centered(detached) if self.center else self.evaluate(detached)
            if noise_seed is not None:
                out += self.sigma(index)[:, None, None] * self.noise(noise_seed, index)
        self._saved = (tables, index, noise_seed) if keep_graph else None
        return out

    def _tables_for_push(self, index: torch.Tensor | None) -> Tables:
        # A family with closed-form parameter gradients needs no graph from its tables to its parameters.
        with torch.no_grad() if self._closed_form else contextlib.nullcontext():
            return self.tables(index)

    def predict_into(self, rows: TileRows, keep_graph: bool = True) -> None:
        """`predict` of every tile, noise-free, written into the weight rows ``rows`` (`writes_rows` banks)."""
        tables = self._tables_for_push(None)
        with torch.no_grad():
            self.evaluate_into(tuple(t.detach() for t in tables), rows)
        self._saved = (tables, None, None) if keep_graph else None

    def push_from(self, rows: TileRows) -> bool:
        """`push` of the gradient in the weight-gradient rows ``rows``; False (nothing done) if the last `predict`
        added noise, whose gradient needs the tile-shaped copy that `push` takes."""
        if self._saved is None:
            raise RuntimeError("push_from() needs a preceding predict(keep_graph=True) of this bank")
        tables, index, noise_seed = self._saved
        if noise_seed is not None or index is not None:
            return False
        self._saved = None
        with torch.no_grad():
            table_grads = self.evaluate_backward_from(tuple(t.detach() for t in tables), rows)
            closed = self.table_backward(index, table_grads)
        self._accumulate(tables, table_grads, closed, [], [])
        return True

    def push(self, grad: torch.Tensor) -> None:
        """Add the gradient of ``sum(grad * predicted tiles)`` to the bank's parameters' ``.grad``.

        ``grad`` has the shape of the last `predict`'s output (keep_graph=True) and may be modified in place.
        """
        if self._saved is None:
            raise RuntimeError("push() needs a preceding predict(keep_graph=True) of this bank")
        tables, index, noise_seed = self._saved
        self._saved = None
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        if noise_seed is not None:  # the noise is added after centring: it sees the raw gradient
            tensors.append(self.sigma(index))
            grads.append((grad * self.noise(noise_seed, index)).sum((1, 2)))
        with torch.no_grad():
            if self.center:
                center_tiles_(grad)  # the centring is a symmetric projection: its backward is itself
            table_grads = self.evaluate_backward(tuple(t.detach() for t in tables), grad)
            closed = self.table_backward(index, table_grads)
        self._accumulate(tables, table_grads, closed, tensors, grads)

    def _accumulate(self, tables: Tables, table_grads: Tables, closed, tensors: list, grads: list) -> None:
        """Add the parameters' gradients (closed-form pairs, else autograd through ``tables``) to their ``.grad``."""
        if closed is None:
            if self._closed_form:
                raise RuntimeError(f"{type(self).__name__}.table_backward returned None; it must return the pairs")
            for tensor, g in zip(tables, table_grads):
                if tensor.requires_grad:
                    tensors.append(tensor)
                    grads.append(g)
        # Accumulated by hand rather than by backward(): no gradient hook of an engine fires on the g-nets here
        # (DeepSpeed's would queue them for a reduction of its next backward; see hf_gb.distributed).
        pairs = list(closed or [])
        if tensors:
            params = [p for p in self.parameters() if p.requires_grad]
            pairs += zip(params, torch.autograd.grad(tensors, params, grads, allow_unused=True))
        for param, g in pairs:
            if g is None or not param.requires_grad:
                continue
            if param.grad is not None:
                param.grad.add_(g)
            elif g.stride() == param.stride():
                param.grad = g
            else:  # an einsum's permuted result: a fused optimizer reads grad and param as flat memory of one layout
                param.grad = torch.empty_like(param).copy_(g)

    def __getstate__(self):
        # What predict kept for push holds an autograd graph, which neither copies nor pickles; a copy starts clean.
        return {**self.__dict__, "_saved": None}

    def discard(self) -> None:
        """Drop what the last `predict` kept for `push` (e.g. after a checkpoint load)."""
        self._saved = None

    # ----------------------------------------------------------------- the separable first layer (mlp, deep)
    def _init_separable(
        self, config: GBConfig, hidden: int, generator: torch.Generator, shared: bool = False, b1_std: float = 0.1
    ) -> None:
        """Position codes and the first layer ``w_row``, ``w_col``, ``w_ker``, ``b1`` of ``hidden`` units per tile,
        drawn in that order from ``generator``, with code pre-activations of unit variance. ``shared``: one set of
        code weights ``(1, bits, hidden)`` for the whole bank, and only ``b1`` per tile."""
        g, n = self.geometry, self.n_tiles
        m = 1 if shared else n
        self._shared_codes = shared
        self.register_buffer("row_codes", position_codes(g.rows, config.encoding), persistent=False)  # (rows, br)
        self.register_buffer("col_codes", position_codes(g.cols, config.encoding), persistent=False)  # (cols, bc)
        br, bc = code_width(g.rows, config.encoding), code_width(g.cols, config.encoding)
        std = 1 / math.sqrt(max(1, br + bc + (1 if g.kernel_bits else 0)))
        self.w_row = _randn(generator, m, br, hidden, std=std)
        self.w_col = _randn(generator, m, bc, hidden, std=std)
        self.w_ker = _randn(generator, m, g.kernel_bits, hidden, std=std) if g.kernel_bits else None
        self.b1 = _randn(generator, n, hidden, std=b1_std)

    @torch.no_grad()
    def sparse_biases_(self, active: float, generator: torch.Generator) -> None:
        """Set each tile's first-layer biases so that every hidden unit is active (pre-activation > 0) on the
        fraction ``active`` of the tile's positions: minus the ``1 - active`` quantile of its pre-activations over
        every position or, in larger tiles, `SPARSE_SAMPLE` random ones. No unit starts dead or everywhere linear."""
        g = self.geometry
        if g.rows * g.cols * g.kernel < 2:  # one position: nothing to be sparse over
            return
        self.b1.zero_()
        A, B = self._separable_tables(None)  # (n, rows, h), (n, cols * K, h) without the biases
        n, rows, h = A.shape
        cols = B.shape[1]
        exact = rows * cols <= SPARSE_SAMPLE
        samples = rows * cols if exact else SPARSE_SAMPLE
        # k samples stay below 0 and at least one above; the bias sits halfway between the k-th and the next.
        k = min(samples - 1, max(1, round((1 - active) * samples)))
        step = max(1, (1 << 22) // (samples * h))  # tiles per chunk: at most 4M pre-activations at once
        for t0 in range(0, n, step):
            a, b = A[t0 : t0 + step], B[t0 : t0 + step]
            if exact:
                pre = (a[:, :, None, :] + b[:, None, :, :]).reshape(a.shape[0], samples, h)
            else:
                i = torch.randint(rows, (a.shape[0], samples, 1), generator=generator).expand(-1, -1, h)
                j = torch.randint(cols, (a.shape[0], samples, 1), generator=generator).expand(-1, -1, h)
                pre = a.gather(1, i) + b.gather(1, j)
            self.b1[t0 : t0 + step] = -(pre.kthvalue(k, dim=1).values + pre.kthvalue(k + 1, dim=1).values) / 2

    def _separable_tables(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = codes_row @ w_row + b1`` (n, rows, h) and ``B = codes_col @ w_col (+ w_ker)`` (n, cols * K, h).

        Shared code weights give one ``B`` for every tile, expanded (and copied: the kernels take one table per
        tile); the autograd of the expansion sums the tiles' gradients into the shared weights."""
        g = self.geometry

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if self._shared_codes else _pick(t, index)

        A = torch.einsum("rb,nbh->nrh", self.row_codes, pick(self.w_row)) + _pick(self.b1, index)[:, None, :]
        B = torch.einsum("cb,nbh->nch", self.col_codes, pick(self.w_col))  # (n or 1, cols, h)
        if self.w_ker is not None:
            B = (B[:, :, None, :] + pick(self.w_ker)[:, None, :, :]).reshape(B.shape[0], g.cols * g.kernel, -1)
        B = B.expand(A.shape[0], -1, -1)  # a no-op for per-tile weights
        # Contiguous tables: einsum may return a permuted layout, and one layout per shape keeps the compiled
        # kernels to one compilation (their guards include strides).
        return A.contiguous(), B.contiguous()

    def _separable_backward(
        self, index: torch.Tensor | None, dA: torch.Tensor, dB: torch.Tensor
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Closed-form gradients of `_separable_tables`' parameters from ``dA`` (n, rows, h), ``dB`` (n, cols*K, h).

        Shared code weights get the sum over the tiles (the backward of their expansion to every tile)."""
        g = self.geometry
        b1 = (self.b1, _scatter(self.b1, index, dA.sum(1)))
        if self._shared_codes:  # sum the tiles first: the einsums then run once, not once per tile
            dA, dB = dA.sum(0, keepdim=True), dB.sum(0, keepdim=True)
        pairs = [(self.w_row, torch.einsum("rb,nrh->nbh", self.row_codes, dA))]
        if self.w_ker is not None:
            dB = dB.reshape(dB.shape[0], g.cols, g.kernel, dB.shape[2])
            pairs.append((self.w_ker, dB.sum(1)))
            dB = dB.sum(2)
        pairs.append((self.w_col, torch.einsum("cb,nch->nbh", self.col_codes, dB)))
        if not self._shared_codes:
            pairs = [(p, _scatter(p, index, grad)) for p, grad in pairs]
        return [pairs[0], b1, *pairs[1:]]

    def forward(self, index: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
        """Differentiable noise-free prediction of tiles ``index`` (fused kernels, or the unfused reference)."""
        tables = self.tables(index)
        out = self.reference(tables) if reference else _BankFunction.apply(self, *tables)
        return center_tiles(out) if self.center else out

    @torch.no_grad()
    def calibrate(
        self,
        target_std: torch.Tensor,
        index: torch.Tensor | None = None,
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Set each tile's scale so that its noise-free prediction has std ``target_std[t]`` over its positions.

        ``index`` predicts only those tiles and ``reduce`` sums, in place, the ``(n_tiles, 3)`` float64 table of
        per-tile (std, mean, count) over processes (e.g. an all-reduce), so that processes that each hold some
        tiles end with the scales one process would set.
        """
        self.scale.fill_(1.0)
        stats = self.scale.new_zeros(self.n_tiles, 3, dtype=torch.float64)  # (std, mean, count) per tile
        if index is None or len(index):
            std, mean = torch.std_mean(self.predict(index, keep_graph=False).flatten(1), dim=1, correction=0)
            stats[slice(None) if index is None else index] = torch.stack(
                [std.double(), mean.double(), torch.ones_like(std, dtype=torch.float64)], 1
            )
        if reduce is not None:
            reduce(stats)
        if not bool((stats[:, 2] > 0).all()):
            raise RuntimeError("calibrate: some tiles were predicted by no process")
        std, mean = (stats[:, :2] / stats[:, 2:]).to(self.scale.dtype).unbind(1)
        self._remove_mean_(mean)
        target = target_std.to(self.scale)
        # A tile of one position (or a degenerate g-net) has no spread to match: keep unit gain there.
        self.scale.copy_(torch.where(std > 1e-6, target / std.clamp_min(1e-6), target))

    def _remove_mean_(self, mean: torch.Tensor) -> None:
        """Shift an uncentred bank's output by ``-mean`` per tile (at unit scale); centred banks have no mean."""

    def extra_repr(self) -> str:
        return f"family={self.family!r}, geometry={self.geometry.key()}, n_tiles={self.n_tiles}"


def _pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t[index]


def _scatter(param: torch.Tensor, index: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``param`` whose tiles ``index`` got ``grad`` (the inverse of `_pick`)."""
    return grad if index is None else torch.zeros_like(param).index_add_(0, index, grad)


def _randn(generator: torch.Generator, *shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator) * std)


class _BankFunction(torch.autograd.Function):
    """Autograd over a bank's fused kernels: saves only the tables, recomputes what the backward needs."""

    @staticmethod
    def forward(ctx, bank: GNetBank, *tables: torch.Tensor) -> torch.Tensor:
        ctx.bank = bank
        ctx.save_for_backward(*tables)
        return bank.evaluate(tables)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *ctx.bank.evaluate_backward(ctx.saved_tensors, grad.contiguous()))


def __getattr__(name: str):
    # MLPBank lives with the other families in hf_gb.families; ``hf_gb.bank.MLPBank`` keeps working (PEP 562).
    if name == "MLPBank":
        from .families import MLPBank

        return MLPBank
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

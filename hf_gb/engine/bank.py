"""g-net banks: the g-nets of every tile of one geometry, stored as stacked tensors and run as one batched call.

A bank owns its whole math. `GNetBank` is the interface every g-net family implements and the one code path
they share: ``predict`` (no graph to the weights, centring, output scale and noise applied), ``push`` (the chain
rule from a tile gradient into the bank's own parameters), ``forward`` (the differentiable prediction) and
``calibrate``. A family supplies four pieces: ``tables`` (small differentiable tensors from which the tiles
follow), ``evaluate`` and ``evaluate_backward`` (the fused kernels) and ``reference`` (an unfused twin for tests);
optionally ``table_backward`` (closed-form parameter gradients) and the in-place rows route (``writes_rows``,
``evaluate_into``, ``evaluate_backward_from``). The families themselves live in `hf_gb.engine.families` and
register by name in `hf_gb.engine.registry`; `pick`, `scatter` and `randn_parameter` are the small helpers they
share.

Every method takes ``index``, the tiles to compute (a LongTensor, or None for all): a rank that holds only some
rows of a weight predicts just the tiles that intersect them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .kernels import center_tiles, center_tiles_, prediction_only
from .kernels import kernel_path as _kernel_path
from .tiling import TileGeometry, TileRows

if TYPE_CHECKING:
    from .config import GBConfig

__all__ = ["GNetBank", "Tables"]

Tables = tuple[torch.Tensor, ...]

class GNetBank(nn.Module):
    """``n_tiles`` g-nets over tiles of one `TileGeometry`: the interface of every family and their shared code.

    The prediction of tile ``t`` is ``center(raw_t) * scale[t] + sigma_t * noise`` where ``raw`` is the family's
    function of the tile's positions, ``center`` the optional double centring (`hf_gb.engine.kernels.center_tiles`) and
    ``sigma_t = init_noise * scale[t] * exp(log_sigma[t])`` the learned noise of stochastic banks. The scale is
    a buffer (saved, moved by ``.to()``) that `calibrate` sets to the layer's own initial std.
    """

    family: ClassVar[str]
    # The family's own settings (`GBConfig.family_options`): name -> `hf_gb.engine.registry.FamilyOption`.
    options: ClassVar[dict[str, Any]] = {}
    # Whether `calibrate` also zeroes the mean of an uncentred bank's tiles (through an output bias of the family).
    removes_mean: ClassVar[bool] = True

    @classmethod
    def option(cls, config: GBConfig, name: str) -> Any:
        """One of this family's `options`: ``config.family_options``'s value, else the option's default. A config
        of another family (``"auto"`` dispatching here) holds none of this family's options: the defaults."""
        given = (config.family_options or {}) if config.family == cls.family else {}
        return given.get(name, cls.options[name].default)

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
        """`evaluate`, double-centred (`hf_gb.engine.kernels.center_tiles`); a family may fuse the two."""
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

    def sparse_biases_(self, active: float, generator: torch.Generator) -> None:
        """Optional: set the first-layer biases so that hidden units start active on the fraction ``active`` of
        each tile's positions (`GBConfig.init_active`; the separable families of `hf_gb.engine.families` do)."""
        raise NotImplementedError(f"g-net family {self.family!r} does not support GBConfig.init_active")

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

        With ``keep_graph`` the bank keeps the small tables (and their graph to its parameters) for one `push`;
        without, it never waits for a kernel build (`hf_gb.engine.kernels.prediction_only`).
        """
        if noise_seed is not None and self.log_sigma is None:
            raise ValueError("noise_seed given to a bank without learned noise (GBConfig.stochastic=False)")
        tables = self._tables_for_push(index)
        with torch.no_grad(), contextlib.nullcontext() if keep_graph else prediction_only():
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
        with torch.no_grad(), contextlib.nullcontext() if keep_graph else prediction_only():
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
        # (DeepSpeed's would queue them for a reduction of its next backward; see hf_gb.training.distributed).
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


def pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` (tiles) of a per-tile tensor; all of it for None."""
    return t if index is None else t[index]


def scatter(param: torch.Tensor, index: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``param`` whose tiles ``index`` got ``grad`` (the inverse of `pick`)."""
    return grad if index is None else torch.zeros_like(param).index_add_(0, index, grad)


def randn_parameter(generator: torch.Generator, *shape: int, std: float) -> nn.Parameter:
    """A parameter of ``shape`` drawn from ``generator``, normal with std ``std``."""
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


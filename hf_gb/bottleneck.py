"""`GenomicBottleneck`: attaches g-net banks to any ``nn.Module`` and keeps its covered weights predicted."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bank import GNetBank
from .config import GBConfig
from .kernels import center_tiles_, fused_backward, fused_forward, use_compiled
from .layers import coverable, name_matches, view3d
from .tiling import TileGeometry, choose_geometry, compression_of, grid, tile_into, untile_into

logger = logging.getLogger(__name__)

# Tile used when the config names neither `compression` nor `tile_size`.
DEFAULT_TILE_SIZE = (128, 128)


@dataclass
class CoveredTensor:
    """One model tensor whose values the g-nets predict."""

    name: str  # full parameter name in the model (first name, for tied tensors)
    module_type: str
    layout: str
    shape: tuple[int, int, int]  # the (out, in, K) view
    param_shape: tuple[int, ...]
    geometry: TileGeometry
    offset: int  # first tile in its bank
    n_tiles: int
    param: nn.Parameter

    def gnet_params(self, hidden_dim: int) -> int:
        return self.n_tiles * self.geometry.gnet_params(hidden_dim)

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layout": self.layout,
            "shape": list(self.param_shape),
            "tile": [g.rows, g.cols, g.kernel],
            "n_tiles": self.n_tiles,
        }


class GenomicBottleneck(nn.Module):
    """g-nets that predict the covered weights of ``model``.

    The model is referenced, not registered: ``parameters()`` and ``state_dict()`` of the bottleneck are exactly the
    g-net parameters (and their output scales). One optimizer step is::

        gb.predict_weights()          # g-nets -> model weights, in place
        loss = model(x).loss; loss.backward()   # any number of micro-batches
        gb.push_gradients()           # accumulated weight grads -> g-net grads
        optimizer.step(); optimizer.zero_grad(); gb.zero_grad()

    with ``optimizer`` over ``gb.parameters()`` and ``gb.uncompressed_parameters()``.

    Example::

        >>> import torch
        >>> from hf_gb import GBConfig, GenomicBottleneck
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> gb = GenomicBottleneck(model, GBConfig(hidden_dim=8, tile_size=32))
        >>> gb.stats()["covered_params"]
        9472
    """

    def __init__(self, model: nn.Module, config: GBConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else GBConfig()
        object.__setattr__(self, "_model", model)  # not a submodule: our parameters are the g-nets only
        self.covered: list[CoveredTensor] = []
        self.skipped: list[tuple[str, str]] = []  # (name, reason) of weights left uncompressed
        self.banks = nn.ModuleDict()
        self._tables: dict[str, tuple[torch.Tensor, ...]] | None = None
        self._noise_seed: int | None = None
        # Sharded models (FSDP2 DTensors, see hf_gb.sharding): this rank's rows of each covered weight and, per
        # bank, the tiles that intersect them; empty on an unsharded model.
        self._shards: dict[str, Any] = {}
        self._plans: dict[str, Any] = {}
        self._shard_group: Any = None
        self._full_uncompressed: dict[str, torch.Tensor] | None = None  # set while `sharding.gathered` saves

        targets = self._find_targets(model)
        by_geometry: dict[TileGeometry, list[CoveredTensor]] = {}
        for name, module_type, layout, param in targets:
            shape = tuple(view3d(torch.empty(param.shape, device="meta"), layout).shape)  # full shape (DTensors)
            geometry = self._geometry(shape)
            ratio = compression_of(shape, geometry, config.hidden_dim)
            if ratio < config.min_compression:
                self.skipped.append((name, f"g-nets would compress it only {ratio:.2f}x"))
                continue
            group = by_geometry.setdefault(geometry, [])
            n_tiles = math.prod(grid(shape, geometry))
            offset = sum(t.n_tiles for t in group)
            group.append(CoveredTensor(name, module_type, layout, shape, tuple(param.shape), geometry, offset,
                                       n_tiles, param))
        generator = torch.Generator().manual_seed(config.seed)
        for geometry, group in by_geometry.items():
            n = sum(t.n_tiles for t in group)
            bank = GNetBank(
                geometry, n, config.hidden_dim, config.encoding, config.stochastic, generator, center=config.center
            )
            self.banks[geometry.key()] = bank
            self.covered.extend(group)
        order = {name: i for i, (name, *_rest) in enumerate(targets)}
        self.covered.sort(key=lambda t: order[t.name])  # model order, for tables and files
        device = next((t.param.device for t in self.covered), None)
        if device is not None:
            self.to(device)
        if any(type(t.param).__name__ == "DTensor" for t in self.covered):  # e.g. FSDP2: plan shard-local work
            from .sharding import rebind

            rebind(self, model)
        self._calibrate()
        self.predict_weights(sample=False)
        self._tables = None

    # ----------------------------------------------------------------- construction
    def _geometry(self, shape: tuple[int, int, int]) -> TileGeometry:
        c = self.config
        tile_size = c.tile_size if c.tile_size is not None or c.compression is not None else DEFAULT_TILE_SIZE
        return choose_geometry(shape, c.hidden_dim, c.compression, tile_size)

    def _find_targets(self, model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
        """(name, module type, layout, parameter) of each tensor to cover, each parameter once."""
        c = self.config
        owners: dict[int, list[tuple[str, bool]]] = {}  # id(param) -> [(param name, coverable here)]
        found: dict[int, tuple[str, str, str, nn.Parameter]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            explicit = c.target_modules is not None
            wanted = name_matches(mod_name, c.target_modules) if explicit else True
            if name_matches(mod_name, c.exclude_modules):
                wanted = False
            specs = coverable(module, opt_in=explicit) or []
            spec_attrs = {s.attr: s for s in specs}
            for attr, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{attr}" if mod_name else attr
                spec = spec_attrs.get(attr)
                ok = wanted and spec is not None and param.dim() >= 2
                owners.setdefault(id(param), []).append((full, ok))
                if ok and id(param) not in found:
                    found[id(param)] = (full, type(module).__name__, spec.layout, param)
                elif wanted and explicit and spec is None and param.dim() >= 2 and not specs:
                    self.skipped.append((full, f"unsupported module type {type(module).__name__}"))
        targets = []
        for pid, entry in found.items():
            refused = [n for n, ok in owners[pid] if not ok]
            if refused:  # tied to a tensor we must not cover (e.g. lm_head tied to the input embedding)
                self.skipped.append((entry[0], f"tied to {refused[0]}, which is not covered"))
            else:
                targets.append(entry)
        return targets

    @torch.no_grad()
    def _calibrate(self) -> None:
        """Match each tile's predicted std to its layer's current (initial) weights (DESIGN.md §4)."""
        for key, bank in self.banks.items():
            target = torch.empty(bank.n_tiles)
            for t in self._tensors(key):
                if t.name in self._shards:  # exact std of the whole weight from the shards (one all-reduce)
                    from .sharding import exact_std

                    std = exact_std(t.param, self._shards[t.name])
                else:
                    w = t.param.detach().float()
                    std = w.std().item() if w.numel() > 1 else 0.0
                if not std > 0:  # zero or constant init: fall back to the fan-in rule
                    std = 1 / math.sqrt(t.shape[1] * t.shape[2])
                target[t.offset : t.offset + t.n_tiles] = std
            bank.calibrate(target, self._compiled(bank))

    # ----------------------------------------------------------------- the step
    @property
    def model(self) -> nn.Module:
        return self._model

    def _tensors(self, key: str) -> Iterator[CoveredTensor]:
        return (t for t in self.covered if t.geometry.key() == key)

    def _compiled(self, bank: GNetBank) -> bool:
        return use_compiled(self.config.kernel, bank.n_tiles * bank.geometry.numel)

    def _noise(self, key: str, bank: GNetBank, out: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=out.device).manual_seed(self._noise_seed + sum(map(ord, key)))
        plan = self._plans.get(key)
        if plan is None:
            return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        # Shard-local: the same draw as one process makes, restricted to this rank's tiles (O(bank) memory).
        g = bank.geometry
        full = torch.randn((bank.n_tiles, g.rows, g.cols * g.kernel), generator=gen, device=out.device,
                           dtype=out.dtype)
        return full[plan.index.to(out.device)]

    def _sigma(self, bank: GNetBank, plan: Any = None) -> torch.Tensor:
        sigma = self.config.init_noise * bank.scale * bank.log_sigma.exp()  # (n,)
        return sigma if plan is None else sigma[plan.index.to(sigma.device)]

    def predict_weights(self, sample: bool | None = None) -> None:
        """Write the g-nets' prediction into the covered weights (in place) and keep what `push_gradients` needs.

        ``sample`` (default: ``self.training and config.stochastic``) adds the learned per-tile noise.
        Raises ``RuntimeError`` if covered weights still hold gradients that were never pushed.
        """
        pending = [t.name for t in self.covered if t.param.grad is not None]
        if pending:
            raise RuntimeError(
                f"predict_weights() called while {len(pending)} covered weights (e.g. {pending[0]}) hold gradients "
                "that push_gradients() has not consumed; push (or zero the model's gradients) first"
            )
        sample = (self.training and self.config.stochastic) if sample is None else sample
        self._noise_seed = int(torch.randint(0, 2**31 - 1, ())) if sample else None
        self._tables = {}
        for key, bank in self.banks.items():
            tables = bank.tables()  # small, keeps the autograd graph to the g-net parameters
            plan = self._plans.get(key)
            if plan is not None:  # sharded: only the tiles that intersect this rank's rows
                tables = tuple(x[plan.index.to(x.device)] for x in tables)
                if not len(plan.index):
                    self._tables[key] = tables
                    continue
            with torch.no_grad():
                out = fused_forward(*(x.detach() for x in tables), compiled=self._compiled(bank))
                if bank.center:
                    center_tiles_(out)
                if sample:
                    out += self._sigma(bank, plan)[:, None, None] * self._noise(key, bank, out)
                if plan is not None:
                    from .sharding import write_bank

                    write_bank(out, plan)
                else:
                    for t in self._tensors(key):
                        untile_into(view3d(t.param.data, t.layout), out[t.offset : t.offset + t.n_tiles],
                                    t.geometry)
            self._tables[key] = tables

    def push_gradients(self) -> None:
        """Chain rule from the covered weights' accumulated ``.grad`` into the g-net parameters' ``.grad``.

        Adds to the g-net gradients (call ``zero_grad()`` after each optimizer step) and sets the covered
        weights' ``.grad`` to None. Must follow `predict_weights`; one push per prediction.
        """
        if self._tables is None:
            raise RuntimeError("push_gradients() called without a preceding predict_weights() for this step")
        tensors, grads = [], []
        for key, bank in self.banks.items():
            members = list(self._tensors(key))
            plan = self._plans.get(key)
            if all(t.param.grad is None for t in members) or (plan is not None and not len(plan.index)):
                continue
            g0 = bank.geometry
            n = bank.n_tiles if plan is None else len(plan.index)
            G = torch.empty(n, g0.rows, g0.cols * g0.kernel, dtype=bank.w2.dtype, device=bank.w2.device)
            if plan is not None:  # this rank's rows of each tile, zeros elsewhere; summed over ranks below
                from .sharding import grad_bank

                grad_bank(G, plan)
            for t in members if plan is None else ():
                dst = G[t.offset : t.offset + t.n_tiles]
                if t.param.grad is None:  # this tensor took no part in the loss
                    dst.zero_()
                else:  # written straight into the bank's tile layout: no padded or concatenated copies
                    tile_into(dst, view3d(t.param.grad, t.layout), t.geometry)
                    t.param.grad = None  # freed as soon as copied: G replaces the grads instead of adding to them
            if self._noise_seed is not None:  # the noise is added after centring: it sees the raw gradient
                eps = self._noise(key, bank, G)
                tensors.append(self._sigma(bank, plan))
                grads.append((G * eps).sum((1, 2)))
                del eps
            if bank.center:
                center_tiles_(G)  # backward of the centring projection is the projection
            A, B, w2, b2 = self._tables[key]
            with torch.no_grad():
                dA, dB, dw2, db2 = fused_backward(A.detach(), B.detach(), w2.detach(), G, self._compiled(bank))
            for tensor, grad in ((A, dA), (B, dB), (w2, dw2), (b2, db2)):
                if tensor.requires_grad:  # b2 is a constant zero for centred banks
                    tensors.append(tensor)
                    grads.append(grad)
        if tensors:
            torch.autograd.backward(tensors, grads)
        if self._shards:  # each rank pushed its rows: the sum over ranks is the gradient of the whole weights
            from .sharding import all_reduce_gradients

            all_reduce_gradients(self.parameters(), self._shard_group)
        for t in self.covered:
            t.param.grad = None
        self._tables = None

    def forward(self) -> None:
        """Same as `predict_weights` (so hooks registered on the bottleneck fire)."""
        self.predict_weights()

    # ----------------------------------------------------------------- bookkeeping
    def uncompressed_parameters(self) -> list[nn.Parameter]:
        """Model parameters an optimizer must still train: everything not covered that requires grad."""
        covered = {id(t.param) for t in self.covered}
        seen, out = set(), []
        for p in self._model.parameters():
            if id(p) not in covered and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
        return out

    def uncompressed_state_dict(self) -> dict[str, torch.Tensor]:
        """Model tensors (parameters and persistent buffers) that the g-nets do not predict, by model name."""
        covered = {id(t.param) for t in self.covered}
        state = {k: v for k, v in self._model.state_dict(keep_vars=True).items() if id(v) not in covered}
        if self._full_uncompressed is not None:  # gathered copies of sharded tensors, for saving
            state = {k: self._full_uncompressed.get(k, v) for k, v in state.items()}
        return state

    def stats(self) -> dict[str, Any]:
        """Sizes and compression ratios: totals and one row per covered tensor."""
        h = self.config.hidden_dim
        rows = [
            {
                "name": t.name,
                "module_type": t.module_type,
                "shape": list(t.param_shape),
                "tile": [t.geometry.rows, t.geometry.cols, t.geometry.kernel],
                "n_tiles": t.n_tiles,
                "numel": t.param.numel(),
                "gnet_params": t.gnet_params(h),
                "compression": t.param.numel() / t.gnet_params(h),
            }
            for t in self.covered
        ]
        covered = sum(r["numel"] for r in rows)
        gnet = sum(p.numel() for p in self.parameters())
        uncompressed = sum(p.numel() for p in self.uncompressed_parameters())
        return {
            "covered_params": covered,
            "gnet_params": gnet,
            "uncompressed_params": uncompressed,
            "covered_compression": covered / gnet if gnet else 1.0,
            "overall_compression": (covered + uncompressed) / (gnet + uncompressed) if gnet + uncompressed else 1.0,
            "tensors": rows,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }

    def summary(self, per_tensor: bool = True) -> str:
        """A printable compression table."""
        s = self.stats()
        lines = []
        if per_tensor:
            width = max([len(r["name"]) for r in s["tensors"]] + [6])
            lines.append(f"{'tensor':<{width}}  {'shape':>16}  {'tile':>12}  {'tiles':>6}  {'g-net':>9}  {'ratio':>8}")
            for r in s["tensors"]:
                shape = "x".join(map(str, r["shape"]))
                tile_ = "x".join(map(str, r["tile"]))
                lines.append(f"{r['name']:<{width}}  {shape:>16}  {tile_:>12}  {r['n_tiles']:>6}  "
                             f"{r['gnet_params']:>9,}  {r['compression']:>7.1f}x")
            for k in s["skipped"]:
                lines.append(f"{k['name']:<{width}}  not covered: {k['reason']}")
        lines.append(
            f"covered params: {s['covered_params']:,} || g-net params: {s['gnet_params']:,} || "
            f"uncompressed params: {s['uncompressed_params']:,} || covered compression: "
            f"{s['covered_compression']:.1f}x || overall compression: {s['overall_compression']:.2f}x"
        )
        return "\n".join(lines)

    def print_summary(self, per_tensor: bool = False) -> None:
        """Print the compression summary (like PEFT's ``print_trainable_parameters``)."""
        print(self.summary(per_tensor=per_tensor))

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory: str, processing_class: Any = None, **kwargs: Any) -> str:
        """Write the compressed checkpoint (see `hf_gb.checkpoint`); loadable with `hf_gb.load_compressed`."""
        from .checkpoint import save_compressed

        return save_compressed(self, save_directory, processing_class=processing_class, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str, model: nn.Module | None = None, **kwargs: Any) -> GenomicBottleneck:
        """Restore a bottleneck from a compressed checkpoint, onto ``model`` or a model built from its config."""
        from .checkpoint import bottleneck_from_pretrained

        return bottleneck_from_pretrained(path_or_repo, model=model, **kwargs)

    def push_to_hub(self, repo_id: str, processing_class: Any = None, **kwargs: Any) -> Any:
        """Push the compressed checkpoint (with its model card) to the Hub repo ``repo_id``; see `hf_gb.hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, processing_class=processing_class, **kwargs)

    def extra_repr(self) -> str:
        return f"covered={len(self.covered)}, banks={len(self.banks)}, hidden_dim={self.config.hidden_dim}"

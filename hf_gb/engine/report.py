"""Sizes and compression ratios of a bottleneck: the rows of `Bottleneck.stats` and the table of its `summary`.

Pure functions of the covered tensors and counts they are given (the bottleneck passes its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .planning import CoveredTensor
from .registry import family_class

if TYPE_CHECKING:
    from .config import GBConfig

__all__ = ["bank_shares", "stats", "summary"]


def bank_shares(banks: Iterable[Sequence[CoveredTensor]], config: GBConfig) -> dict[str, int]:
    """Each covered tensor's share of its bank's shared values (`GNetBank.bank_params`), given the tensors of each
    bank: in proportion to its tiles, rounded so that a bank's shares sum to its shared values exactly (all 0 for
    per-tile families)."""
    shares = {}
    for members in banks:
        if not members:  # after detach_model
            continue
        spec = members[0].spec
        total = family_class(spec.family).bank_params(spec.geometry, spec.bank_config(config))
        n = sum(t.n_tiles for t in members)
        done = 0
        for t in members:
            shares[t.name] = round(total * (done + t.n_tiles) / n) - round(total * done / n)
            done += t.n_tiles
    return shares


def stats(covered: Sequence[CoveredTensor], config: GBConfig, shares: dict[str, int], gnet: int,
          uncompressed: int, skipped: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Totals and one row per covered tensor; ``shares`` are the tensors' shares of their banks' shared values,
    ``gnet`` the g-net values stored and ``uncompressed`` the model values left as they are."""
    values = {t.name: t.gnet_params(config) + shares[t.name] for t in covered}
    rows = [
        {
            "name": t.name,
            "module_type": t.module_type,
            "shape": list(t.param_shape),
            "tile": [t.geometry.rows, t.geometry.cols, t.geometry.kernel],
            "n_tiles": t.n_tiles,
            "numel": t.param.numel(),
            "gnet_params": values[t.name],
            "compression": t.param.numel() / values[t.name],
        }
        for t in covered
    ]
    total = sum(r["numel"] for r in rows)
    return {
        "covered_params": total,
        "gnet_params": gnet,
        "uncompressed_params": uncompressed,
        "covered_compression": total / gnet if gnet else 1.0,
        "overall_compression": (total + uncompressed) / (gnet + uncompressed) if gnet + uncompressed else 1.0,
        "tensors": rows,
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
    }


def summary(s: dict[str, Any], per_tensor: bool = True) -> str:
    """The printable compression table of `stats` ``s``: one line per tensor (``per_tensor``), then the totals."""
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

"""Which module tensors the bottleneck can cover, and how each is viewed as ``(out, in, K)``.

Dispatch is a list of functions; the first that recognises a module returns its coverable tensors. The core does
not import transformers: GPT-2's ``Conv1D`` (weight stored ``(in, out)``) is recognised by name and attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import GBConfig

logger = logging.getLogger(__name__)

# How a stored parameter maps to the (out, in, K) view the tiles are cut from.
LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "matrix": lambda w: w.unsqueeze(-1),  # Linear, Embedding, attention projections: (out, in)
    "kernel": lambda w: w.view(w.shape[0], w.shape[1], -1),  # ConvNd: (out, in / groups, *kernel)
    "transposed": lambda w: w.t().unsqueeze(-1),  # GPT-2 Conv1D: (in, out)
}


def view3d(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``(out, in, K)`` view of a parameter (or its gradient) stored in ``layout``; shares its memory."""
    return LAYOUTS[layout](tensor)


@dataclass(frozen=True)
class Coverable:
    attr: str  # parameter name inside the module
    layout: str


def _linear(m: nn.Module) -> list[Coverable] | None:
    return [Coverable("weight", "matrix")] if isinstance(m, nn.Linear) else None


def _conv(m: nn.Module) -> list[Coverable] | None:
    return [Coverable("weight", "kernel")] if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None


def _gpt2_conv1d(m: nn.Module) -> list[Coverable] | None:
    is_conv1d = type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    return [Coverable("weight", "transposed")] if is_conv1d else None


def _multihead_attention(m: nn.Module) -> list[Coverable] | None:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    if m.in_proj_weight is not None:
        return [Coverable("in_proj_weight", "matrix")]
    return [Coverable(a, "matrix") for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]


def _embedding(m: nn.Module) -> list[Coverable] | None:
    return [Coverable("weight", "matrix")] if isinstance(m, nn.Embedding) else None


# Covered unless the config names other modules. The first function that returns a list wins.
DEFAULT_DISPATCH: list[Callable[[nn.Module], list[Coverable] | None]] = [
    _linear,
    _conv,
    _gpt2_conv1d,
    _multihead_attention,
]
# Covered only when `target_modules` names the module.
OPT_IN_DISPATCH = [_embedding]


def coverable(module: nn.Module, opt_in: bool) -> list[Coverable] | None:
    for fn in DEFAULT_DISPATCH + (OPT_IN_DISPATCH if opt_in else []):
        found = fn(module)
        if found is not None:
            return found
    return None


# Longest a regex may take to match one module name. Patterns come from user files (gb_config.json): a crafted
# one must fail, not hang. Sane patterns match a module name in microseconds.
MATCH_TIMEOUT_S = 0.5


def name_matches(name: str, pattern: None | str | list[str]) -> bool:
    """PEFT-style matching: a string is a regex over the full name, a list matches exact names or name suffixes.

    Raises ``ValueError`` when a regex takes longer than `MATCH_TIMEOUT_S` on one name (catastrophic
    backtracking), naming the pattern.
    """
    if pattern is None:
        return False
    if isinstance(pattern, str):
        import regex  # like `re`, plus a time bound per match

        try:
            return regex.fullmatch(pattern, name, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(
                f"module pattern {pattern[:80]!r} took longer than {MATCH_TIMEOUT_S} s to match the module name "
                f"{name!r}; simplify it (nested repeats such as (a+)+ backtrack catastrophically)"
            ) from None
    return any(name == p or name.endswith("." + p) for p in pattern)


def unmatched_patterns(names: list[str], pattern: None | str | list[str]) -> list[str]:
    """The parts of ``pattern`` that match none of ``names``: the regex itself, or each list entry that matches
    no name (an empty list when every part matches something, or for ``None``).

    For `GenomicBottleneck` to raise on ``target_modules`` that cover nothing, as PEFT does::

        >>> unmatched_patterns(["model.q_proj", "model.v_proj"], ["q_proj", "q_prj"])
        ['q_prj']
        >>> unmatched_patterns(["model.q_proj"], "k_proj")
        ['k_proj']
    """
    if pattern is None:
        return []
    if isinstance(pattern, str):
        return [] if any(name_matches(n, pattern) for n in names) else [pattern]
    return [p for p in pattern if not any(name_matches(n, [p]) for n in names)]


@dataclass(frozen=True)
class Target:
    """A tensor the bottleneck will cover: its first full name, module type, layout, and the parameter."""

    name: str
    module_type: str
    layout: str
    param: nn.Parameter


def find_targets(model: nn.Module, config: GBConfig) -> tuple[list[Target], list[tuple[str, str]]]:
    """The tensors of ``model`` to cover (each parameter once, in model order) and ``(name, reason)`` of skipped ones.

    A tensor tied to one that must not be covered (e.g. an output head tied to an uncovered input embedding) is
    skipped. Raises ``ValueError`` when ``config.target_modules`` names no module of the model (a typo would
    otherwise train a plain model without a word).
    """
    explicit = config.target_modules is not None
    owners: dict[int, list[tuple[str, bool]]] = {}  # id(param) -> [(param name, coverable here)]
    found: dict[int, Target] = {}
    skipped: list[tuple[str, str]] = []
    matched_any = False
    for mod_name, module in model.named_modules(remove_duplicate=False):
        wanted = name_matches(mod_name, config.target_modules) if explicit else True
        matched_any = matched_any or (explicit and wanted)
        if name_matches(mod_name, config.exclude_modules):
            wanted = False
        specs = coverable(module, opt_in=explicit) or []
        spec_attrs = {s.attr: s for s in specs}
        for attr, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            spec = spec_attrs.get(attr)
            ok = wanted and spec is not None and param.dim() >= 2
            owners.setdefault(id(param), []).append((full, ok))
            if ok and id(param) not in found:
                found[id(param)] = Target(full, type(module).__name__, spec.layout, param)
            elif wanted and explicit and spec is None and param.dim() >= 2 and not specs:
                skipped.append((full, f"unsupported module type {type(module).__name__}"))
    if explicit and not matched_any:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}; module names "
            f"look like {[n for n, _ in model.named_modules() if n][:5]}"
        )
    if explicit and not isinstance(config.target_modules, str):
        unmatched = unmatched_patterns([n for n, _ in model.named_modules(remove_duplicate=False)],
                                       config.target_modules)
        if unmatched:  # the others matched: maybe a list shared across architectures, maybe a typo
            logger.warning("target_modules entries %s match no module of %s", unmatched, type(model).__name__)
    targets = []
    for pid, target in found.items():
        refused = [n for n, ok in owners[pid] if not ok]
        if refused:  # tied to a tensor we must not cover (e.g. lm_head tied to the input embedding)
            skipped.append((target.name, f"tied to {refused[0]}, which is not covered"))
        else:
            targets.append(target)
    return targets, skipped

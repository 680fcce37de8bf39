"""The step helper (hf_gb/engine/step.py): ``with gb.step(optimizer, ...)`` equals the four plain calls bit for bit
(accumulation, clipping, a skipped non-finite step), misuse raises errors that say what to do, and an exception
inside a block leaves nothing half done."""

import pytest
import torch
from torch import nn

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine import TrainStep

# Tiles of 16 x 24 overhang both layers' weights (40 x 20, 6 x 40): the in-place route with edge buffers.
CONFIG = dict(hidden_dim=4, tile_size=[16, 24])


def _build(seed=0, **config):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 6))
    gb = GenomicBottleneck(model, GBConfig(**{**CONFIG, **config}))
    return model, gb, torch.optim.AdamW(gb.trainable_parameters(), lr=1e-2)


def _batches(n, bad=()):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(5, 20, generator=gen)
        if i in bad:
            x[0, 0] = float("inf")  # a non-finite loss, so non-finite gradients
        out.append((x, torch.randn(5, 6, generator=gen)))
    return out


def _loss(model, x, y, accumulation):
    return (model(x) - y).pow(2).mean() / accumulation


def _state(model, gb):
    return [p.detach().clone() for p in [*gb.parameters(), *model.parameters()]]


def _plain(batches, accumulation, max_grad_norm, **config):
    """The four plain calls, as README writes them (plus clipping)."""
    model, gb, optimizer = _build(**config)
    states, kept_flags = [], []
    for i, (x, y) in enumerate(batches):
        if i % accumulation == 0:
            gb.predict_weights()
        _loss(model, x, y, accumulation).backward()
        if i % accumulation == accumulation - 1:
            kept_flags.append(gb.push_gradients())
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(gb.trainable_parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            gb.zero_grad()
            states.append(_state(model, gb))
    return states, kept_flags


def _helper(batches, accumulation, max_grad_norm, **config):
    model, gb, optimizer = _build(**config)
    states, stepped = [], []
    for x, y in batches:
        with gb.step(optimizer, accumulation_steps=accumulation, max_grad_norm=max_grad_norm) as step:
            _loss(model, x, y, accumulation).backward()
        if step.micro_batch == 0:
            stepped.append(step.stepped)
            states.append(_state(model, gb))
    return states, stepped, step, gb


@pytest.mark.parametrize(
    "accumulation, max_grad_norm, bad",
    [(1, None, ()), (3, None, ()), (1, 0.05, ()), (3, 0.05, ()), (1, None, (2,)), (3, 0.05, (4,))],
    ids=["plain", "accumulate-3", "clip", "accumulate-3-clip", "skip-nonfinite", "accumulate-3-clip-skip"],
)
def test_helper_equals_the_four_plain_calls(accumulation, max_grad_norm, bad):
    batches = _batches(4 * accumulation, bad)
    want, kept = _plain(batches, accumulation, max_grad_norm)
    got, stepped, step, _ = _helper(batches, accumulation, max_grad_norm)
    assert stepped == kept and len(got) == 4
    assert step.steps == sum(kept) == 4 - len(bad)
    for a_step, b_step in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(a_step, b_step)), "bit for bit"
    if max_grad_norm is not None:  # the last window was finite: its norm before clipping is kept
        assert step.grad_norm is not None and step.grad_norm > max_grad_norm


def test_predicts_and_pushes_once_per_window():
    model, gb, optimizer = _build()
    calls = []
    for name in ("predict_weights", "push_gradients"):
        original = getattr(gb, name)
        setattr(gb, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    steps = set()
    for x, y in _batches(6):
        with gb.step(optimizer, accumulation_steps=3) as step:
            _loss(model, x, y, 3).backward()
        steps.add(id(step))
    assert calls == ["predict_weights", "push_gradients"] * 2
    assert len(steps) == 1, "gb.step returns the same TrainStep while its arguments stay the same"
    assert not gb.prediction_pending and all(p.grad is None for p in [*gb.parameters(), *model.parameters()])


def test_trainable_parameters():
    model, gb, _ = _build()
    assert [id(p) for p in gb.trainable_parameters()] == [id(p) for p in [*gb.parameters(),
                                                                          *gb.uncompressed_parameters()]]


def test_misuse_raises_clear_errors():
    model, gb, optimizer = _build()
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got list"):
        gb.step(gb.trainable_parameters())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"accumulation_steps={bad!r}"):
            gb.step(optimizer, accumulation_steps=bad)
    for bad in (-1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="max_grad_norm="):
            gb.step(optimizer, max_grad_norm=bad)
    n = len(list(gb.parameters()))
    with pytest.raises(ValueError, match=f"lacks {n} of the bottleneck's {n} g-net parameters"):
        gb.step(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"holds 1 covered weights \(e.g. 0.weight\)"):
        gb.step(torch.optim.SGD([*gb.trainable_parameters(), model[0].weight], lr=0.1))

    (x, y), = _batches(1)
    with gb.step(optimizer, accumulation_steps=2):
        _loss(model, x, y, 2).backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=3.*accumulation_steps=2.*has done 1 micro-batches"):
        gb.step(optimizer, accumulation_steps=3)
    with pytest.raises(RuntimeError, match="entered again"):
        with gb.step(optimizer, accumulation_steps=2) as step:
            with step:
                pass
    assert step.micro_batch == 0 and not gb.prediction_pending  # the nested misuse dropped the window

    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) inside"):
        with gb.step(optimizer):
            model(x)
    assert not gb.prediction_pending

    with gb.step(optimizer, accumulation_steps=2):
        _loss(model, x, y, 2).backward()
    gb.push_gradients()  # by hand, in the middle of the window
    with pytest.raises(RuntimeError, match="consumed or dropped between its micro-batches"):
        with gb.step(optimizer, accumulation_steps=2):
            pass
    optimizer.zero_grad()
    gb.zero_grad()
    step = gb.step(optimizer, accumulation_steps=3)  # between windows other arguments make a new helper
    assert isinstance(step, TrainStep) and step.accumulation_steps == 3


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["before-backward", "after-backward", "in-optimizer-step"])
def test_an_exception_drops_the_window(error, where):
    """An exception in the second micro-batch of three leaves no gradient and no kept prediction; the next windows
    then train exactly as a run that never saw the dropped one."""
    batches = _batches(9)
    model, gb, optimizer = _build()
    if where == "in-optimizer-step":  # raise before any parameter changes
        original = optimizer.step
        optimizer.step = lambda *a, **k: (_ for _ in ()).throw(error("boom"))
    for i, (x, y) in enumerate(batches[:3]):
        with pytest.raises(error, match="boom") if i == (2 if where == "in-optimizer-step" else 1) else _no_error():
            with gb.step(optimizer, accumulation_steps=3) as step:
                if where == "after-backward":
                    _loss(model, x, y, 3).backward()
                if i == 1 and where != "in-optimizer-step":
                    raise error("boom")
                _loss(model, x, y, 3).backward()
        if i == 1 and where != "in-optimizer-step":
            break
    if where == "in-optimizer-step":
        optimizer.step = original
    assert step.micro_batch == 0 and not step.stepped and step.steps == 0
    assert not gb.prediction_pending
    assert all(p.grad is None for p in [*gb.parameters(), *model.parameters()])
    got = []
    for x, y in batches[3:]:
        with gb.step(optimizer, accumulation_steps=3):
            _loss(model, x, y, 3).backward()
        if step.micro_batch == 0:
            got.append(_state(model, gb))
    want, _ = _plain(batches[3:], 3, None)
    for a_step, b_step in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(a_step, b_step))


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_docstring_example_runs():
    import doctest

    from hf_gb.engine import step

    result = doctest.testmod(step, raise_on_error=False)
    assert result.attempted >= 8 and result.failed == 0

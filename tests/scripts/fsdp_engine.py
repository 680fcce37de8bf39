"""GenomicBottleneck on an FSDP2 (``fully_shard``) model, against one process (``torchrun --nproc_per_node 2``).

Every rank builds the same tiny model twice: one copy stays whole (the single-process reference, trained on the
full batch inside this process, no communication), the other is wrapped by ``fully_shard`` and trained on this
rank's half of each batch. Row counts are odd and tiles straddle the shard boundary, so some tiles are predicted by
both ranks from different rows. Checked after construction and after each of three optimizer steps: the whole
predicted weights (gathered only here, for the check), the g-net tensors and their pushed gradients, and the
uncompressed tensors' gradients equal the reference; the g-nets are identical on both ranks. Writes
``<report_dir>/rank<r>.json`` with what it compared.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from leave import leave_together
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_gb import GBConfig, GenomicBottleneck
from hf_gb.engine.shards import row_shard

TOL = {"rtol": 1e-5, "atol": 1e-6}


def build(dims: list[int]) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def shard(model: nn.Sequential, mixed: bool) -> nn.Sequential:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: dict) -> float:
    a, b = full(a).detach().float(), full(b).detach().float()
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")
    return float((a - b).abs().max())


def run(case: dict, rank: int, world: int) -> dict:
    dims, accum, mixed = case["dims"], case["accum"], case["mixed"]
    config = GBConfig(family="mlp", hidden_dim=2, tile_size=8, stochastic=case["stochastic"], seed=3,
                      gains=case.get("gains", "none"))
    tol = {"rtol": 2e-2, "atol": 2e-3} if mixed else TOL  # the sharded forward runs in bf16 there
    ref_model = build(dims)
    ref = GenomicBottleneck(ref_model, config)
    model = shard(build(dims), mixed)
    gb = GenomicBottleneck(model, config)
    shards = {t.name: row_shard(t.param) for t in gb.covered}
    assert all(s is not None for s in shards.values()), shards
    report = {"shards": {k: [s.start, s.stop] for k, s in shards.items()}, "max_diff": {}}
    for (n, p), (_, q) in zip(gb.named_parameters(), ref.named_parameters()):
        report["max_diff"][f"init/{n}"] = close(p, q, f"init g-net {n}", TOL)
    for t, r in zip(gb.covered, ref.covered):
        report["max_diff"][f"init/{t.name}"] = close(t.param, r.param, f"initial prediction {t.name}", TOL)

    params = [*gb.parameters(), *gb.uncompressed_parameters()]
    ref_params = [*ref.parameters(), *ref.uncompressed_parameters()]
    # bf16 forwards differ from fp32 by rounding; Adam would turn that into full-size steps on tiny gradients.
    optimizer = (lambda ps: torch.optim.SGD(ps, lr=0.1)) if mixed else (lambda ps: torch.optim.Adam(ps, lr=1e-2))
    opt, ref_opt = optimizer(params), optimizer(ref_params)
    gen = torch.Generator().manual_seed(1)
    per_rank = 3
    for step in range(3):
        xs = torch.randn(accum, world * per_rank, dims[0], generator=gen)
        ys = torch.randn(accum, world * per_rank, dims[-1], generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            ref.predict_weights(sample=case["stochastic"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            gb.predict_weights(sample=case["stochastic"])
        for t, r in zip(gb.covered, ref.covered):
            report["max_diff"][f"step{step}/{t.name}"] = close(t.param, r.param, f"prediction {t.name}", tol)
        for micro in range(accum):
            loss = nn.functional.mse_loss(ref_model(xs[micro]), ys[micro]) / accum
            loss.backward()
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            model.set_requires_gradient_sync(micro == accum - 1)
            loss = nn.functional.mse_loss(model(xs[micro, mine]).float(), ys[micro, mine]) / accum
            loss.backward()
        for p in gb.uncompressed_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, (p.grad is None, p.dtype)
        ref.push_gradients()
        gb.push_gradients()
        for (n, p), (_, q) in zip(gb.named_parameters(), ref.named_parameters()):
            if q.grad is None:
                assert p.grad is None, n
                continue
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (n, p.dtype, p.grad.dtype)
            report["max_diff"][f"step{step}/grad/{n}"] = close(p.grad, q.grad, f"g-net gradient {n}", tol)
        for p, q in zip(gb.uncompressed_parameters(), ref.uncompressed_parameters()):
            close(p.grad, q.grad, "uncompressed gradient", tol)
        opt.step()
        ref_opt.step()
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
        opt.zero_grad()
        ref_opt.zero_grad()
        gb.zero_grad()
        ref.zero_grad()
        # Replicated g-nets: both ranks hold exactly the same values.
        local = torch.stack([p.detach().double().sum() for p in gb.parameters()])
        everyone = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(everyone, local)
        assert all(torch.equal(e, everyone[0]) for e in everyone), everyone
    return report


def main(report_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = [
        {"name": "accum1", "dims": [20, 19, 11, 3], "accum": 1, "stochastic": False, "mixed": False},
        {"name": "accum3", "dims": [20, 19, 11, 3], "accum": 3, "stochastic": False, "mixed": False},
        {"name": "stochastic", "dims": [20, 19, 11, 3], "accum": 1, "stochastic": True, "mixed": False},
        {"name": "bf16", "dims": [20, 19, 11, 3], "accum": 3, "stochastic": False, "mixed": True},
        {"name": "gains", "dims": [20, 19, 11, 3], "accum": 3, "stochastic": False, "mixed": False, "gains": "both"},
    ]
    only = os.environ.get("FSDP_ENGINE_CASES")
    reports = {c["name"]: run(c, rank, world) for c in cases if not only or c["name"] in only.split(",")}
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_together()

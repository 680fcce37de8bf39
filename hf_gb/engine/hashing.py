"""Seeded hashes of weight positions, computed on the fly (nothing of the weights' size is stored).

Random weight sharing (HashedNets, Chen et al., ICML 2015) sets every weight to ``s(p) * v[h(p)]``: a seeded hash
``h`` of the weight's position ``p`` into a small learned vector ``v`` and a seeded random sign ``s``. Only ``v`` is
stored; ``h`` and ``s`` are regenerated from the seed. `bucket_and_sign` is that pair, from one 31-bit integer
hash of ``(seed, p)``: its lowest bit gives the sign, the other 30 the bucket (by a multiply-shift, so
``buckets`` must stay below 2**31).

The arithmetic stays below 2**62 in int64 (31-bit values times 27-bit constants), so it is exact on every device
and in every torch version; the same function in C++ (``hf_gb/engine/csrc/hash_cpu.cpp``) gives the same values.
"""

from __future__ import annotations

import torch

_MASK = (1 << 31) - 1
_MULT = 0x45D9F3B  # the multiplier of a well-known 32-bit integer mixer, < 2**27
_GOLDEN = 0x1E3779B9  # mixes the seed into the position before the rounds


def mix(x: torch.Tensor) -> torch.Tensor:
    """Three multiply-xorshift rounds of int64 values in [0, 2**31): a well-mixed value in [0, 2**31)."""
    for _ in range(3):
        x = (x * _MULT) & _MASK
        x = x ^ (x >> 15)
    return x


def seed_key(*values: int) -> int:
    """A 31-bit key of non-negative ints (a seed and whatever must give other hashes, e.g. a bank's tile shape);
    plain Python arithmetic, the same for every process and platform."""
    key = _GOLDEN
    for value in values:
        while True:
            key = _mix_int(key ^ (value & _MASK))
            value >>= 31
            if not value:
                break
    return key


def _mix_int(x: int) -> int:
    for _ in range(3):
        x = (x * _MULT) & _MASK
        x ^= x >> 15
    return x


def position_hash(positions: torch.Tensor, key: int, wide: bool = True) -> torch.Tensor:
    """31-bit hashes of int64 ``positions`` (any shape, values in [0, 2**62)) under the key of `seed_key`: the
    positions' high bits folded into the low 31, then the rounds of `mix`. ``wide=False`` promises that every
    position is below 2**31 (nothing to fold; the same values, fewer operations)."""
    x = (positions & _MASK) ^ key
    if wide:
        x = x ^ (((positions >> 31) * _GOLDEN) & _MASK)
    return mix(x)


def bucket_and_sign(positions: torch.Tensor, key: int, buckets: int, dtype: torch.dtype,
                    wide: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket in [0, buckets), sign in {-1, +1})`` of every position, from one `position_hash`."""
    x = position_hash(positions, key, wide)
    # (x >> 1) is uniform on [0, 2**30); multiply-shift maps it onto [0, buckets) without a division.
    return ((x >> 1) * buckets) >> 30, ((x & 1) * 2 - 1).to(dtype)

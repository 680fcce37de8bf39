"""The g-net families, registered by name for `GBConfig.family` (the interface they implement:
`hf_gb.engine.bank.GNetBank`; the registry: `hf_gb.engine.registry`).

- ``"mlp"`` (the default, `MLPBank`): one hidden layer over position codes, one g-net per tile.
- ``"deep"`` (`DeepBank`): a second hidden layer after the separable first one.
- ``"shared"`` (`SharedBank`): the one hidden layer of ``"mlp"``, one g-net per bank, a learned embedding per tile.
- ``"coords"`` (`CoordsBank`): "mlp" over the coordinates of ordered positions plus hashed features of the rows,
  sized by the compression target: what ``"auto"`` gives a tensor whose positions carry meaning.
- ``"hash"`` (`HashBank`): random weight sharing (HashedNets), a seeded hash of each position into learned values.

A new family is a module here whose `GNetBank` subclass (`SeparableBank` for a separable first layer) is decorated
with `register_family`, imported below.
"""

from .coords import CoordsBank
from .deep import CHUNK_ELEMENTS, DeepBank
from .hash import HashBank
from .mlp import MLPBank
from .separable import SPARSE_SAMPLE, SeparableBank
from .shared import SharedBank

__all__ = ["CHUNK_ELEMENTS", "SPARSE_SAMPLE", "CoordsBank", "DeepBank", "HashBank", "MLPBank", "SeparableBank",
           "SharedBank"]

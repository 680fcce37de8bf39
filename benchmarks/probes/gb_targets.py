"""Which GBConfig.compression targets give the engine's MNIST MLP the stored values of each covered target."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from baselines import stored_values
from torch import nn

from hf_gb import GBConfig, GenomicBottleneck

COVERED = 784 * 800 + 8000
for pad in (False, True):
    inputs = 1024 if pad else 784
    cov = inputs * 800 + 8000
    for target in (100, 300, 700, 1000):
        want = round(COVERED / target) + 810
        rows = []
        for t in [target * f for f in (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.7, 2.0, 2.5, 3, 4)]:
            t = t * cov / COVERED
            m = nn.Sequential(nn.Linear(inputs, 800), nn.ReLU(), nn.Linear(800, 10))
            gb = GenomicBottleneck(m, GBConfig(compression=t, kernel="eager", encoding="gray" if pad else "binary"))
            rows.append((round(t, 1), stored_values(gb)))
        print("pad" if pad else "784", target, "want", want, rows)

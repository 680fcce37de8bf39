"""Metric modules shipped inside hf_gb, loadable by ``evaluate`` without network access.

Example::

    >>> import evaluate
    >>> from hf_gb import metrics
    >>> evaluate.load(metrics.path("accuracy")).compute(predictions=[0, 1], references=[1, 1])
    {'accuracy': 0.5}
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """Local file of the metric ``name`` for ``evaluate.load``."""
    file = os.path.join(_HERE, f"{name}.py")
    if not os.path.isfile(file):
        available = sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"hf_gb ships no metric {name!r}; available: {available}")
    return file

"""Accuracy, shipped with hf_gb so ``evaluate.load(hf_gb.metrics.path("accuracy"))`` works offline."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) instead of the count of correct predictions.
    sample_weight (list of float): optional weights of the examples.
Returns:
    accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(float)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        score = (correct * weights).sum()
        return {"accuracy": float(score / weights.sum() if normalize else score)}

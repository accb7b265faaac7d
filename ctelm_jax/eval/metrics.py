"""Text metrics of decoded trials (ROUGE-L, BLEU), summaries of per-trial scores, and the Wilson interval of a share;
the cosines of re-embedding and retrieval are `vectors`'."""

from __future__ import annotations

from typing import Sequence

import math

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F1 of each prediction against its reference (rouge-score's tokenisation, no stemming)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 0-100) of predictions against one reference each."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, median and count of the finite values."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": int(v.size)}


WILSON_Z = 1.959964  # the normal quantile of a two-sided 95% interval


def wilson_interval(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a share of k successes in n trials; (0, 1) when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"a share needs 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact ends, not rounded ones

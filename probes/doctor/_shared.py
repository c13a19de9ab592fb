"""General helpers the doctor needs that the shared modules do not offer yet.

:func:`paired_bootstrap_diff` belongs beside :func:`probes.metrics.bootstrap_ci` (the one speaker
bootstrap); it lives here until the two are merged.
"""
from __future__ import annotations

import numpy as np

from featstore.cv import fill_groups
from probes.metrics import bacc_from_confusion, group_confusions


def paired_bootstrap_diff(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray,
                          n_classes: int, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``bacc(a) - bacc(b)``, resampling speakers (paired: both predictions
    of one item stay together). Items without a group count as their own speaker
    (:func:`featstore.cv.fill_groups`); NaN with fewer than two groups."""
    g = fill_groups(groups)
    ca = group_confusions(y, pred_a, g, n_classes).astype(np.float64)
    cb = group_confusions(y, pred_b, g, n_classes).astype(np.float64)
    G = ca.shape[0]
    if G < 2 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
    k2 = n_classes * n_classes
    da = bacc_from_confusion((w @ ca.reshape(G, k2)).reshape(n_boot, n_classes, n_classes))
    db = bacc_from_confusion((w @ cb.reshape(G, k2)).reshape(n_boot, n_classes, n_classes))
    lo, hi = np.nanpercentile(da - db, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)

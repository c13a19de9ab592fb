"""Step 8, class imbalance (last): the best configuration with and without balanced class weights.

Checks:

* FAIL: a class is almost never recognised (recall < 0.1) even with the better weighting;
* WARN: without weighting the rarest class is neglected (its recall < 0.3) and balanced weighting
  raises the lowest recall by >= 0.15;
* PASS otherwise, with the change in balanced accuracy and the per-class recalls.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from probes.doctor.result import FAIL, PASS, WARN, Step
from probes.doctor.screen import logreg_oof, oof_bacc, recalls
from probes.doctor.view import View

NAME = "class imbalance"
#: recall below which a class counts as never recognised
NEVER_RECALL = 0.1
#: unweighted lowest recall below which, and the gain from weighting above which, weighting is advised
NEGLECTED_RECALL, WEIGHTING_GAIN = 0.3, 0.15


def run(view: View, done: Mapping[str, Step]) -> Step:  # noqa: ARG001
    screen = view.screen
    y, k = view.y, view.k
    pred_b = logreg_oof(view.X(*screen.best), y, view.folds, k, "balanced", view.seed)
    res = {"none": (screen.best_pred, screen.best_score), "balanced": (pred_b, oof_bacc(y, pred_b, k))}
    counts = np.bincount(y, minlength=k)
    ev: dict[str, Any] = {"imbalance_ratio": float(counts.max() / max(1, counts.min())),
                          "balanced_accuracy": {w: s for w, (_, s) in res.items()},
                          "recall": {w: recalls(y, p, view.classes) for w, (p, _) in res.items()}}
    better = max(res, key=lambda w: (round(res[w][1], 6), w == "none"))
    rec = ev["recall"]
    min_none = min(rec["none"].values())
    min_bal = min(rec["balanced"].values())
    worst = min(rec[better], key=rec[better].get)
    rec_msg = "; ".join(f"{w}: bacc {s:.2f}, recall " + ", ".join(f"{c} {v:.2f}" for c, v in rec[w].items())
                        for w, (_, s) in res.items())
    if rec[better][worst] < NEVER_RECALL:
        return Step(NAME, FAIL, ev, f"class {worst!r} is almost never recognised ({rec_msg})",
                    "more data for that class, merge classes, or fix the upstream steps first")
    if min_none < NEGLECTED_RECALL and min_bal - min_none >= WEIGHTING_GAIN:
        return Step(NAME, WARN, ev, f"without weighting the rarest classes are neglected ({rec_msg})",
                    "use --class-weight balanced (or sampling)")
    d = res["balanced"][1] - res["none"][1]
    return Step(NAME, PASS, ev, f"balanced weighting changes balanced accuracy by {d:+.2f} ({rec_msg})",
                "use --class-weight balanced" if d >= 0.02 else "")

"""Step 7, layer profile: the best layer per pooling, how flat the curve is, and the baseline.

Checks (WARN; the step never fails):

* a flat profile (more than two layers, range of the screen scores < 0.03 for both poolings);
* the label-shuffle control failed (the profile is noise until it passes);
* with ``--baseline`` (an acoustic store of the same items, e.g. log-Mel): the model does not beat
  the baseline (paired speaker bootstrap of the difference of the two logistic-regression scores on
  the same folds; PASS only when the 95 % interval lies above 0).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from probes.bootstrap import paired_difference_ci
from probes.doctor.result import FAIL, PASS, WARN, Step
from probes.doctor.screen import lda_cv_predict, logreg_oof, oof_bacc, screen_features
from probes.doctor.view import View

NAME = "layer profile"
#: a profile whose range over layers is below this is flat
FLAT_RANGE = 0.03


def run(view: View, done: Mapping[str, Step]) -> Step:
    screen = view.screen
    ev: dict[str, Any] = {"chance": view.chance}
    best_per, ranges = {}, {}
    for pooling in ("mean", "stats"):
        sc = {layer: screen.scores[(layer, pooling)] for layer in view.layers}
        bl = max(sc, key=lambda l: (round(sc[l], 6), -l))
        best_per[pooling] = {"layer": bl, "balanced_accuracy": sc[bl]}
        ranges[pooling] = max(sc.values()) - min(sc.values())
    ev["best_per_pooling"] = best_per
    ev["range_over_layers"] = ranges
    ev["screen"] = {f"{l}/{p}": s for (l, p), s in screen.scores.items()}
    null_all = np.concatenate(list(screen.null.values()))
    ev["shuffled_95th_percentile"] = float(np.percentile(null_all, 95)) if null_all.size else float("nan")
    flat = len(view.layers) > 2 and max(ranges.values()) < FLAT_RANGE
    parts = [f"best layer {v['layer']} for {p} ({v['balanced_accuracy']:.2f})" for p, v in best_per.items()]
    msg = "; ".join(parts) + (f"; the curve is flat (range {max(ranges.values()):.2f})" if flat else
                              f"; range over layers {max(ranges.values()):.2f}")
    status, advice = PASS, f"sweep around layer {screen.best[0]} first"
    if flat:
        status, advice = WARN, "a flat profile: the cue is either everywhere or nowhere; check the shuffle control"
    shuffle = done.get("label-shuffle control")
    if shuffle is not None and shuffle.status == FAIL:
        status = WARN
        advice = "no layer beats shuffled labels: the profile is noise until the shuffle control passes"
    if view.baseline is not None:
        b_status, b_msg, b_ev = _baseline(view)
        ev.update(b_ev)
        msg += "; " + b_msg
        if b_status == WARN:
            status = WARN
            advice = "the model adds nothing over the acoustic baseline here: check padding, layers and scope"
    return Step(NAME, status, ev, msg, advice)


def _baseline(view: View) -> tuple[str, str, dict]:
    """The model's best configuration vs the baseline store's best, on the items both hold."""
    screen, base = view.screen, view.baseline
    common, folds = base.common, base.folds
    y, name = view.y[common], base.name
    bscores, bpooled = {}, {}
    for layer in base.layers:
        stats = base.pooled[(layer, "stats")]
        for pooling in ("mean", "stats"):
            X = stats if pooling == "stats" else stats[:, : stats.shape[1] // 2]
            if not np.isfinite(X).all():
                continue
            bpooled[(layer, pooling)] = X
            pred = lda_cv_predict(screen_features(X, seed=view.seed), y[None, :], folds, view.k)[0]
            bscores[(layer, pooling)] = oof_bacc(y, pred, view.k)
    if not bscores:
        return WARN, f"baseline {name}: no finite features", {"baseline_name": name}
    bkey = max(bscores, key=lambda c: (round(bscores[c], 6), -c[0]))
    b_pred = logreg_oof(bpooled[bkey], y, folds, view.k, None, view.seed)
    if folds is view.folds:
        m_pred = screen.best_pred[common]
    else:
        m_pred = logreg_oof(view.X(*screen.best)[common], y, folds, view.k, None, view.seed)
    m, b = oof_bacc(y, m_pred, view.k), oof_bacc(y, b_pred, view.k)
    lo, hi = paired_difference_ci(y, m_pred, b_pred, view.groups[common], view.k, seed=view.seed)
    ev = {"baseline_name": name, "baseline_balanced_accuracy": b, "baseline_layer": bkey[0],
          "model_balanced_accuracy": m, "model_minus_baseline": m - b, "difference_ci_low": lo,
          "difference_ci_high": hi, "baseline_items": len(common),
          "baseline_label_mismatches": base.label_mismatches}
    pts = 100 * (m - b)
    if lo > 0:
        return PASS, (f"the model beats {name} by {pts:.1f} points ({m:.2f} vs {b:.2f}, 95 % CI "
                      f"{100 * lo:.1f} to {100 * hi:.1f})"), ev
    if hi < 0:
        return WARN, f"the model does not beat {name}: {name} is {-pts:.1f} points better ({b:.2f} vs {m:.2f})", ev
    return WARN, (f"the model does not clearly beat {name} ({m:.2f} vs {b:.2f}, difference {pts:+.1f} points, "
                  f"95 % CI {100 * lo:.1f} to {100 * hi:.1f})"), ev

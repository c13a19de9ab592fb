"""Step 5, label-shuffle control: does the best configuration beat shuffled labels?

A permutation test of the screen's best (layer, pooling). When every speaker has one label, labels
are shuffled *across speakers* (speaker-level shuffle): scikit-learn's
``permutation_test_score(groups=...)`` shuffles within groups, which then changes nothing.
Otherwise labels are shuffled across items. The p-value is selection-aware: each shuffle repeats
the choice of the best (layer, pooling) among all screened ones (max statistic).

* FAIL: p > 0.05 (no better than shuffled labels);
* WARN: above shuffled labels, but fold sanity failed (the score is inflated by leaky folds);
* SKIP: no permutations requested.
"""
from __future__ import annotations

from typing import Any, Mapping


from probes.doctor import confounds
from probes.doctor.result import FAIL, PASS, SKIP, WARN, Step
from probes.doctor.screen import ALPHA, p_value
from probes.doctor.view import View

NAME = "label-shuffle control"


def run(view: View, done: Mapping[str, Step]) -> Step:
    screen = view.screen
    key = screen.best
    obs = screen.scores[key]
    ev: dict[str, Any] = {"layer": key[0], "n_permutations": view.n_perm, "chance": view.chance,
                          "logreg_balanced_accuracy": screen.best_score, "screen_balanced_accuracy": obs}
    if view.n_perm < 1:
        return Step(NAME, SKIP, ev, "no permutations requested", "use --n-permutations 100")
    null_best = screen.null[key]
    null_max = screen.null_max
    obs_max = max(screen.scores.values())
    p_fixed = p_value(obs, null_best)
    p_sel = p_value(obs_max, null_max)
    ev.update(shuffled_mean=float(null_best.mean()), shuffled_sd=float(null_best.std()),
              shuffled_max_mean=float(null_max.mean()), p_value=p_sel, p_value_fixed_config=p_fixed,
              shuffle=1 if screen.shuffle_kind == "speaker-level" else 0)
    cfg = f"layer {key[0]} {key[1]}"
    conf = done.get(confounds.NAME)
    dur = conf.evidence.get("duration_balanced_accuracy") if conf is not None else None
    note = (f"; note that duration alone scores {dur:.2f} (see confounds)"
            if confounds.significant(conf).get("duration") and dur is not None else "")
    detail = (f"best config ({cfg}) scores {obs:.2f} (logreg {screen.best_score:.2f}); with labels shuffled "
              f"({screen.shuffle_kind} shuffle, {view.n_perm}x) {null_best.mean():.2f} +- {null_best.std():.2f}, "
              f"best of all configs {null_max.mean():.2f}; p = {p_sel:.3f} (selection-aware){note}")
    if p_sel > ALPHA:
        return Step(NAME, FAIL, ev, f"no better than shuffled labels: {detail}",
                    "the features carry no detectable label signal: check label alignment, pooling scope and "
                    "layers before tuning probes")
    folds = done.get("fold sanity")
    if folds is not None and folds.status == FAIL:
        return Step(NAME, WARN, ev, f"above shuffled labels, but on leaky folds: {detail}",
                    "fix the fold problem; this score is inflated until then", caused_by="fold sanity")
    return Step(NAME, PASS, ev, detail)

"""The numbers behind the doctor's layer-profile figure (drawn by
:func:`probes.plots.draw_doctor_profile`): the screen score per layer for each pooling, the best
configuration's logistic-regression score, chance, the shuffled-label 95th percentile and the
baseline."""
from __future__ import annotations

import numpy as np

from probes.doctor.result import Step


def profile_data(view, layer_step: Step | None) -> dict:
    """The numbers the figure shows, from the view's screen and the layer-profile step."""
    screen = view.screen
    if screen is None:
        return {}
    null_all = np.concatenate(list(screen.null.values()))
    prof = {"scores": dict(screen.scores), "layers": list(view.layers), "chance": view.chance,
            "null_hi": float(np.percentile(null_all, 95)) if null_all.size else float("nan"),
            "best": screen.best, "best_logreg": screen.best_score}
    ev = layer_step.evidence if layer_step is not None else {}
    if ev.get("baseline_balanced_accuracy") is not None:
        prof["baseline"] = {"name": ev.get("baseline_name", "baseline"), "score": ev["baseline_balanced_accuracy"]}
    return prof

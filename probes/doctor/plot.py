"""The layer-profile figure: screen score per layer for each pooling, the best configuration's
logistic-regression score, chance, the shuffled-label 95th percentile and the baseline."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

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


def plot_profile(prof: Mapping, store: str, path: Path) -> Path | None:
    if not prof:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    layers = prof["layers"]
    for pooling, marker in (("mean", "o"), ("stats", "s")):
        ax.plot(layers, [prof["scores"][(k, pooling)] for k in layers], marker=marker, ms=4,
                label=f"{pooling} (screen)")
    bl, bp = prof["best"]
    ax.plot([bl], [prof["best_logreg"]], "k*", ms=12, label=f"best, logreg ({bp})")
    ax.axhline(prof["chance"], color="grey", ls="--", lw=1, label="chance")
    if np.isfinite(prof.get("null_hi", np.nan)):
        ax.axhline(prof["null_hi"], color="grey", ls=":", lw=1, label="shuffled labels, 95th pct")
    if "baseline" in prof:
        ax.axhline(prof["baseline"]["score"], color="tab:red", ls="-.", lw=1.2,
                   label=f"baseline {prof['baseline']['name']} (logreg)")
    ax.set_xlabel("layer")
    ax.set_ylabel("balanced accuracy (out of fold)")
    ax.set_title(f"layer profile: {Path(store).stem}")
    if len(layers) > 1:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Step 4, features and alignment: pipeline bugs that make every later number meaningless.

Checks (all FAIL):

* items with NaN/inf features (they are left out of the later steps);
* a layer whose features are constant across items (>= 99.9 % of its dimensions);
* **labels shifted by one row**: the screen probe is scored with the labels as given and with the
  label column moved by one row (row i given the label of row i-1, or of row i+1), on every
  screened (layer, pooling). When a shifted column scores >= 0.05 higher than the given one and
  beats the shuffled labels (selection-aware p <= 0.05), the labels do not belong to their items:
  an off-by-one between the audio and the label column. Needs label shuffles (``n_permutations``).

This step replaces the former "tiny-subset overfit" (~10 items per class fit to ~100 % training
accuracy), which could not fail on misaligned labels: with features wider than the subset, any
labels - even shuffled ones - are fit perfectly. A misalignment that is not a row shift (a sorted
or re-joined label column) makes the labels look like noise and shows in the label-shuffle control.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from probes.doctor.result import FAIL, PASS, Step
from probes.doctor.screen import ALPHA, SHIFTS, best_config, p_value
from probes.doctor.view import View

NAME = "features and alignment"
#: share of constant dimensions that makes a layer constant
CONSTANT_SHARE = 0.999
#: gain (balanced accuracy) of a shifted label column over the given one that means misalignment
SHIFT_GAIN = 0.05

_FEATURE_ADVICE = "re-extract: NaN/inf frames come from a broken decode, an fp16 overflow or a model bug"


def _shift_words(s: int) -> str:
    return "the next row" if s > 0 else "the previous row"


def run(view: View, done: Mapping[str, Step]) -> Step:  # noqa: ARG001
    ev: dict[str, Any] = {"items_nonfinite": view.nonfinite}
    if view.nonfinite_per_layer:
        ev["nonfinite_items_per_layer"] = {str(k): v for k, v in view.nonfinite_per_layer.items()}
    fails, advice = [], []
    if view.nonfinite:
        fails.append(f"{view.nonfinite} items have NaN/inf features (layers "
                     f"{','.join(map(str, view.nonfinite_per_layer))})")
        advice.append(_FEATURE_ADVICE)
    if view.fatal:
        return Step(NAME, FAIL, ev, "; ".join(fails) or view.fatal, _FEATURE_ADVICE)
    ev["constant_dims_share"] = {str(k): v for k, v in view.constant_share.items()}
    const = [str(k) for k, v in view.constant_share.items() if v >= CONSTANT_SHARE]
    if const:
        fails.append(f"features are constant across items in layer(s) {','.join(const)}")
        advice.append("re-extract: constant frames come from a failed extraction (silent input, a broken model)")
    screen = view.screen
    given_key = best_config(screen.scores)
    given = screen.scores[given_key]
    ev["given_balanced_accuracy"] = given
    ev["shifted_balanced_accuracy"] = {f"{s:+d}": max(screen.shifted[s].values()) for s in SHIFTS}
    shift_msg = ""
    if view.n_perm < 1:
        shift_msg = "label shift not tested (no label shuffles requested)"
    else:
        s = max(SHIFTS, key=lambda j: max(screen.shifted[j].values()))
        key = best_config(screen.shifted[s])
        shifted = screen.shifted[s][key]
        p = p_value(shifted, screen.null_max)
        gain = shifted - given
        ev.update(shift=s, shift_gain=gain, shift_p_value=p, shift_layer=key[0], shift_pooling=key[1])
        if gain >= SHIFT_GAIN and p <= ALPHA:
            fails.append(
                f"the labels fit the features better when each item takes the label of {_shift_words(s)}: "
                f"{shifted:.2f} (layer {key[0]} {key[1]}) vs {given:.2f} as given (shuffled labels: "
                f"p = {p:.3f}), so the label column is shifted by one row against the audio")
            advice.append("check how labels were joined to the audio (a header row, an off-by-one in a merge), "
                          "fix the manifest and re-extract")
        else:
            shift_msg = (f"labels as given {given:.2f}, shifted by one row "
                         + " / ".join(f"{v:.2f}" for v in ev["shifted_balanced_accuracy"].values()))
    if fails:
        return Step(NAME, FAIL, ev, "; ".join(fails), "; ".join(advice))
    return Step(NAME, PASS, ev, f"features finite and not constant; {shift_msg}")

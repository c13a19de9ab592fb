"""Step 2, confounds: can a trivial property of the clip predict the label, and how much is speaker?

Checks:

* **duration** alone and **loudness** (``rms_db``) alone: the screen probe on ``[z, z^2, z^3]`` of
  the standardised value, on the speaker-grouped folds, against the label shuffles of the screen.
  FAIL when significant (p <= 0.05; effect size only without shuffles) and >= 0.20 above chance,
  WARN when >= 0.10 above chance;
* **speaker**: how well the best configuration's features identify the speaker (stratified folds
  within speakers, :func:`featstore.cv.inner_folds`), and the label score with speakers shared
  between train and test (ungrouped folds) vs held out. WARN when sharing speakers gains >= 0.20
  while held-out speakers score within 0.05 of chance (the label is only decodable by recognising
  speakers).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from featstore.cv import inner_folds
from probes.doctor.result import FAIL, PASS, WARN, Step
from probes.doctor.screen import ALPHA, lda_cv_predict, oof_bacc, p_value, perm_test
from probes.doctor.view import View

NAME = "confounds"
#: excess over chance (balanced accuracy) of a confound alone that fails / warns
FAIL_EXCESS, WARN_EXCESS = 0.20, 0.10


def significant(step: Step | None) -> dict[str, str]:
    """``{confound: status}`` of the confounds that warned or failed (e.g. ``{"duration": "fail"}``)."""
    if step is None:
        return {}
    return dict(step.evidence.get("significant", {}))


def run(view: View, done: Mapping[str, Step]) -> Step:  # noqa: ARG001 - the first step after the view
    screen = view.screen
    y, k, folds = view.y, view.k, view.folds
    ev: dict[str, Any] = {"chance": view.chance}
    verdicts: list[tuple[str, str]] = []
    parts = []
    for name, raw in (("duration", view.duration), ("loudness", view.rms_db)):
        fin = np.isfinite(raw)
        if not fin.any() or np.std(raw[fin]) == 0:
            ev[f"{name}_balanced_accuracy"] = float("nan")
            parts.append(f"{name}: not available")
            continue
        raw = np.where(fin, raw, raw[fin].min())  # e.g. -inf dB of digital silence
        z = (raw - raw.mean()) / raw.std()
        X = np.column_stack([z, z ** 2, z ** 3])
        obs, null, _ = perm_test(X, y, screen.shuffled, folds, k)
        p = p_value(obs, null)
        ev[f"{name}_balanced_accuracy"] = obs
        ev[f"{name}_shuffled"] = float(np.mean(null)) if len(null) else float("nan")
        ev[f"{name}_p_value"] = p
        excess = obs - view.chance
        sig = p <= ALPHA if len(null) else True  # without shuffles: effect size only
        parts.append(f"{name} alone {obs:.2f} (chance {view.chance:.2f}" + (f", p={p:.3f})" if len(null) else ")"))
        if sig and excess >= FAIL_EXCESS:
            verdicts.append((FAIL, name))
        elif sig and excess >= WARN_EXCESS:
            verdicts.append((WARN, name))
    spk_msg = _speaker(view, ev, verdicts)
    ev["significant"] = {name: st for st, name in verdicts}
    msg = "; ".join(parts) + spk_msg
    if any(v == FAIL for v, _ in verdicts):
        bad = [n for v, n in verdicts if v == FAIL]
        return Step(NAME, FAIL, ev, f"{' and '.join(bad)} alone predict(s) the label: {msg}",
                    f"a probe can score by reading clip {bad[0]}; balance {bad[0]} across classes, pool over "
                    f"segments, or report the {bad[0]}-only score beside every probe score")
    if verdicts:
        what = [n for _, n in verdicts]
        advice = ("the label is only decodable by recognising speakers: keep speaker-grouped folds and "
                  "question the labels" if what == ["speaker"] else
                  f"{what[0]} carries some label information: report the {what[0]}-only score beside probe scores")
        return Step(NAME, WARN, ev, msg, advice)
    return Step(NAME, PASS, ev, f"no confound above chance: {msg}")


def _speaker(view: View, ev: dict, verdicts: list[tuple[str, str]]) -> str:
    """Speaker identity from the best configuration's features and what an ungrouped CV would gain."""
    screen = view.screen
    y, k = view.y, view.k
    Xb = screen.feats[screen.best]
    _, g = np.unique(view.groups.astype(str), return_inverse=True)
    sizes = np.bincount(g)
    keep = (sizes[g] >= 2) & (view.groups != "")
    if not (keep.sum() >= 4 and len(np.unique(g[keep])) >= 2):
        return "; speaker test not run (no speakers with two or more items)"
    gi = np.unique(g[keep], return_inverse=True)[1]
    n_spk = int(gi.max()) + 1
    # the speaker is the target here: every speaker must be seen in training (folds within speakers)
    sk = inner_folds(gi, None, min(3, int(np.bincount(gi).min())), view.seed)
    pred = lda_cv_predict(Xb[keep], gi[None, :], sk, n_spk)[0]
    spk_acc = float(np.mean(pred == gi))
    ev["speaker_id_accuracy"] = spk_acc
    ev["speaker_id_chance"] = 1.0 / n_spk
    if np.bincount(y).min() < len(view.folds):
        return ""
    # deliberately leaky: folds stratified by item, speakers shared between train and test
    shared = inner_folds(y, None, len(view.folds), view.seed)
    ung = oof_bacc(y, lda_cv_predict(Xb, y[None, :], shared, k)[0], k)
    grp = screen.scores[screen.best]
    ev["label_score_speakers_shared"] = ung
    ev["label_score_speakers_held_out"] = grp
    if ung - grp >= 0.2 and grp - view.chance < 0.05:
        verdicts.append((WARN, "speaker"))
    return (f"; the speaker is identified from the features with accuracy {spk_acc:.2f} "
            f"(chance {ev['speaker_id_chance']:.2f}); with speakers shared between train and test "
            f"the label scores {ung:.2f} vs {grp:.2f} held out")

"""Step 6, padding and pooling: were the frames padded, and does padded pooling win for a wrong reason?

Checks on the store's frames:

* FAIL: more than half of the items have more frames than their audio allows (padding stored as
  frames); every item has the same number of frames although clip lengths differ; all clips have
  the same length *and* their first or last frames are near-identical across items (the audio was
  padded before extraction); a ``pooled/`` cache in the store that disagrees with the frames (read,
  never written); true-frame or segment pooling collapses (one class for > 90 % of the items);
* WARN: first or last frames near-identical across items (silence or padding at one end); every
  clip has the same number of samples; the store is not padding-exact (``padding_exact`` false,
  e.g. written with ``--emulate-padding``: its frames are what a padded pipeline computes, with the
  recipe and the extraction's padding audit quoted); padded pooling collapses.

Then the padded comparison, on the best layer, mean pooling, logistic regression, same folds:

* **measured** (``--padded P``: a store of the same items written by the common recipe): the exact
  store's true-frame means vs the padded store's means over all its frames. FAIL when the padded
  store scores >= 0.05 higher, duration alone predicts the label (step 2) and the advantage
  vanishes (< 0.05) once clip duration (a cubic in log duration) is regressed out of both feature
  sets inside each training fold: pooling over padding encodes duration. WARN when the advantage vanishes that
  way although duration alone is not a significant confound;
* **simulated** (without ``--padded``; no model is run): ``mean(true frames) * T / P``, the mean
  after zero padding to ``P`` frames (1 s, or the longest clip). WARN when it scores >= 0.05 higher
  and duration alone predicts the label. A simulation cannot show what padding does inside the
  model (group norm, attention); the report says "simulated".

For an exact store, the extraction's padding audit (how far padding inside the model moves the
frames) is quoted as information about what a padded pipeline would compute.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from probes.doctor import confounds
from probes.doctor.result import FAIL, PASS, WARN, Step, pct
from probes.doctor.screen import collapse, logreg_oof, oof_bacc
from probes.doctor.view import View

NAME = "padding and pooling"
#: fixed length (seconds) of the simulated pad-to-fixed-length pipeline (or the longest clip)
PAD_SECONDS = 1.0
#: a padded variant scoring this much higher than true-frame pooling is a padded "win"
PADDED_WIN = 0.05
#: largest relative difference between a pooled/ cache and the frames' pooling that is not stale
CACHE_TOLERANCE = 1e-3


def duration_basis(log_duration: np.ndarray) -> np.ndarray:
    """``[1, z, z^2, z^3]`` of the standardised log duration: what "duration regressed out" removes."""
    d = np.asarray(log_duration, dtype=np.float64)
    z = (d - d.mean()) / (d.std() or 1.0)
    return np.column_stack([np.ones_like(z), z, z ** 2, z ** 3])


def _recipe_words(recipe: Any) -> str:
    if not isinstance(recipe, Mapping) or not recipe:
        return "recipe not recorded"
    parts = []
    if recipe.get("pad_seconds") is not None:
        parts.append(f"pad or cut to {recipe['pad_seconds']} s")
    if "keep_padding" in recipe:
        parts.append("padded frames kept" if recipe["keep_padding"] else "true frames cut out after the model")
    parts += [f"{k}={v}" for k, v in recipe.items() if k not in ("pad_seconds", "keep_padding")]
    return "recipe: " + ", ".join(parts)


def _frames(view: View, ev: dict, fails: list, warns: list, advice: list) -> tuple[np.ndarray, float, float, float]:
    """Checks (a)-(c) on the stored frames; returns (T, stride, receptive field, sample rate)."""
    attrs = view.attrs
    stride = float(attrs.get("frame_stride_samples") or 0)
    rf = float(attrs.get("receptive_field_samples") or 0)
    sr = float(attrs.get("sample_rate") or 0)
    T, ns = view.num_frames.astype(np.float64), view.num_samples
    padded_frames = False
    if stride > 0 and np.isfinite(ns).all():
        expected = np.where(ns >= rf, np.floor((ns - rf) / stride) + 1, 0)
        excess = T - expected
        flagged = excess > np.maximum(3, 0.25 * expected)
        ev["items_with_unexplained_frames"] = float(flagged.mean())
        share = 1 - expected[flagged].sum() / max(1.0, T[flagged].sum()) if flagged.any() else 0.0
        ev["padding_frame_share"] = float(max(0.0, share))
        if flagged.mean() > 0.5:
            padded_frames = True
            fails.append(f"{pct(flagged.mean())} of the items have more frames than their audio allows "
                         f"(~{pct(ev['padding_frame_share'])} of their frames are padding)")
    if len(np.unique(T)) == 1 and len(np.unique(ns)) > 1 and len(T) >= 10:
        padded_frames = True
        fails.append(f"every item has exactly {int(T[0])} frames although clip lengths differ")
    same_len = len(np.unique(ns)) == 1 and len(ns) >= 10
    ev["all_clips_same_length"] = bool(same_len)
    ratios, ends = [], []
    for sf, sl in view.edge_spread.values():
        if max(sf, sl) > 1e-9:
            ratios.append(float(min(sf, sl) / max(sf, sl)))
            ends.append("last" if sl < sf else "first")
    ratio = float(np.median(ratios)) if ratios else float("nan")
    end = max(set(ends), key=ends.count) if ends else "last"
    ev["edge_frame_spread_ratio"] = ratio
    trailing = bool(ratios) and ratio < 0.25
    edge_msg = (f"the {end} frames are near-identical across items (their spread is {ratio:.2f} of the "
                f"{'first' if end == 'last' else 'last'} frames')")
    if trailing and same_len and not padded_frames:
        fails.append(f"all clips have the same length and {edge_msg}: the audio was padded before extraction")
    elif trailing and not padded_frames:
        warns.append(f"{edge_msg}: silence or padding at that end")
    elif trailing:
        fails[-1] += f"; {edge_msg}"
    elif same_len:
        warns.append("every clip has the same number of samples: was the audio padded or cut before extraction?")
    if padded_frames or (trailing and same_len):
        advice.append("re-extract padding-exact (featstore extract keeps each clip's true frames)")
    return T, stride, rf, sr


def _exactness(view: View, ev: dict, warns: list, advice: list) -> str:
    """Check (d): is the store padding-exact? Returns the audit sentence for the summary."""
    attrs = view.attrs
    audit = attrs.get("padding_audit") or {}
    exact = bool(attrs.get("padding_exact", False))
    ev["padding_exact"] = exact
    audit_msg = ""
    if isinstance(audit, Mapping) and audit.get("max_abs"):
        mx = np.asarray(audit.get("max_abs"), dtype=np.float64)
        mn = np.asarray(audit.get("mean_abs", []), dtype=np.float64)
        ev["audit_max_abs"] = float(mx.max())
        ev["audit_mean_abs"] = float(mn.max()) if mn.size else float("nan")
        ev["audit_pad_seconds"] = audit.get("pad_seconds")
        where = f"layer {int(mx.argmax())}"
        if audit.get("clips"):
            where += f"; {audit['clips']} clips"
        if audit.get("pad_seconds") is not None:
            where += f" padded to {audit['pad_seconds']} s"
        audit_msg = f"padding inside the model moves frames by up to {mx.max():.2f} ({where}, extraction's audit)"
        if audit.get("reference") == "full-30s":  # a Whisper --context-seconds store: the audit is of the window
            ctx = audit.get("context_seconds")
            ev["audit_context_seconds"] = ctx
            win = f"{ctx:g}-s" if isinstance(ctx, (int, float)) else "shortened"
            where = f"layer {int(mx.argmax())}" + (f"; {audit['clips']} clips" if audit.get("clips") else "")
            audit_msg = (f"the {win} context window moves frames by up to {mx.max():.2f} against Whisper's full "
                         f"30-s window ({where}, extraction's audit)")
            if exact:
                return f"{audit_msg}; the store's frames are the {win} window's, each clip's own"
    if not exact:
        recipe = _recipe_words(attrs.get("padding_recipe"))
        ev["padding_recipe"] = attrs.get("padding_recipe") if isinstance(attrs.get("padding_recipe"), Mapping) else None
        warns.append(f"this store is not padding-exact ({recipe}): its frames are what a padded pipeline "
                     "computes, not each clip's own frames" + (f"; {audit_msg}" if audit_msg else ""))
        advice.append("re-extract padding-exact, or give this store to --padded beside an exact store")
        return ""
    if audit_msg:
        return f"{audit_msg}; this store is padding-exact, so that is what a padded pipeline would compute"
    return "no padding audit recorded"


def run(view: View, done: Mapping[str, Step]) -> Step:
    screen = view.screen
    y, k, folds = view.y, view.k, view.folds
    layer = screen.best[0]
    ev: dict[str, Any] = {"layer": layer}
    fails: list[str] = []
    warns: list[str] = []
    advice: list[str] = []
    T, stride, rf, sr = _frames(view, ev, fails, warns, advice)
    audit_msg = _exactness(view, ev, warns, advice)
    bad_cache = {key: v for key, v in view.cache_check.items() if not v <= CACHE_TOLERANCE}
    ev["pooled_cache_checked"] = len(view.cache_check)
    ev["pooled_cache_mismatch"] = len(bad_cache)
    if bad_cache:
        first = next(iter(bad_cache))
        fails.append(f"the pooled/ cache disagrees with the frames ({len(bad_cache)} arrays, e.g. pooled/{first})")
        advice.append("delete the store's pooled/ group (h5py: del f['pooled']) so sweeps re-pool from the frames")
    conf = done.get(confounds.NAME)
    dur = confounds.significant(conf).get("duration")
    if view.padded is not None:
        padded_name, scores, shares, win = _measured(view, layer, ev, fails, warns, advice, dur, conf)
    else:
        padded_name, scores, shares, win = _simulated(view, layer, T, stride, rf, sr, ev, fails, warns, advice, dur)
    seg_msg = ""
    if "segment" in scores:
        seg_msg = f", segment {scores['segment']:.2f}"
        if scores["segment"] - scores["true"] >= PADDED_WIN:
            advice.append("pool over segments (--scope segment)")
    ev["balanced_accuracy"] = scores
    ev["largest_predicted_share"] = shares
    summary = (f"layer {layer} mean pooling: true frames {scores['true']:.2f}, {padded_name} "
               f"{scores['padded']:.2f}{seg_msg}" + (f"; {audit_msg}" if audit_msg else "") + win["note"])
    cause = "confounds" if win["through_duration"] and dur == FAIL else None
    adv = "; ".join(dict.fromkeys(advice))
    if fails:
        return Step(NAME, FAIL, ev, "; ".join(fails) + f" ({summary})", adv or "check how the frames were extracted",
                    caused_by=cause if win["fail"] and len(fails) == 1 else None)
    if warns:
        return Step(NAME, WARN, ev, "; ".join(warns) + f" ({summary})", adv, caused_by=cause)
    return Step(NAME, PASS, ev, summary, adv)


def _score_variants(variants: Mapping[str, np.ndarray], y: np.ndarray, folds, k: int, seed: int, classes,
                    fails: list, warns: list) -> tuple[dict, dict]:
    scores, shares = {}, {}
    for name, X in variants.items():
        pred = logreg_oof(X, y, folds, k, None, seed)
        scores[name] = oof_bacc(y, pred, k)
        share, cls, collapsed = collapse(y, pred, k)
        shares[name] = share
        if collapsed:
            (fails if name != "padded" else warns).append(
                f"{name} pooling collapses: it predicts {classes[cls]!r} for {pct(share)} of the items")
    return scores, shares


def _simulated(view: View, layer: int, T, stride, rf, sr, ev, fails, warns, advice, dur):
    if stride > 0 and sr > 0:
        pad_len = max(int(np.floor((PAD_SECONDS * sr - rf) / stride)) + 1, int(T.max()))
    else:
        pad_len = int(T.max())
    ev["padded_source"] = "simulated"
    ev["pad_frames"] = pad_len
    clip_mean = view.X(layer, "clip-mean")
    variants = {"true": clip_mean, "padded": clip_mean * (np.minimum(T, pad_len) / pad_len)[:, None]}
    if view.scope == "segment":
        variants["segment"] = view.X(layer, "mean")
    scores, shares = _score_variants(variants, view.y, view.folds, view.k, view.seed, view.classes, fails, warns)
    ev["padding_share_simulated"] = float(1 - np.minimum(T, pad_len).sum() / (pad_len * len(T)))
    delta = scores["padded"] - scores["true"]
    ev["padded_minus_true"] = delta
    win = {"through_duration": False, "fail": False, "note": ""}
    if delta >= PADDED_WIN and dur:
        win["through_duration"] = True
        warns.append(f"simulated padded pooling scores {delta:+.2f} higher only because it encodes clip duration, "
                     "which alone predicts the label (see confounds): a confound, not a win")
        advice.append("keep true-frame pooling and report the duration-only score beside it")
    elif delta >= PADDED_WIN:
        win["note"] = (f"; simulated padded pooling scores {delta:+.2f} higher although duration alone does not "
                       "predict the label: padding turns the mean into a sum, so a short cue is no longer diluted "
                       "by long clips")
        advice.append("the cue looks short: pool over segments or use stats/max pooling rather than padding")
    name = f"simulated padding to {pad_len} frames (the mean diluted by zeros; no model run)"
    return name, scores, shares, win


def _measured(view: View, layer: int, ev, fails, warns, advice, dur, conf):
    pad = view.padded
    common = pad.common
    y, folds = view.y[common], pad.folds
    x_true = view.X(layer, "clip-mean")[common]
    x_pad = pad.pooled[(layer, "clip-mean")]
    variants = {"true": x_true, "padded": x_pad}
    if view.scope == "segment":
        variants["segment"] = view.X(layer, "mean")[common]
    scores, shares = _score_variants(variants, y, folds, view.k, view.seed, view.classes, fails, warns)
    basis = duration_basis(view.duration[common])
    resid = {}
    for name in ("true", "padded"):
        pred = logreg_oof(variants[name], y, folds, view.k, None, view.seed, confound=basis)
        resid[name] = oof_bacc(y, pred, view.k)
    delta = scores["padded"] - scores["true"]
    delta_resid = resid["padded"] - resid["true"]
    dur_score = conf.evidence.get("duration_balanced_accuracy") if conf is not None else None
    ev.update(padded_source="measured", padded_store=pad.path, padded_items=len(common),
              padded_recipe=pad.attrs.get("padding_recipe") if isinstance(pad.attrs.get("padding_recipe"), Mapping) else None,
              padded_minus_true=delta, balanced_accuracy_duration_regressed_out=resid,
              padded_minus_true_duration_regressed_out=delta_resid,
              padded_label_mismatches=pad.label_mismatches)
    win = {"through_duration": False, "fail": False, "note": ""}
    dur_words = (f"duration alone scores {dur_score:.2f}, step 2" if dur_score is not None
                 else "duration alone was not scored")
    nums = f"true {resid['true']:.2f} vs padded {resid['padded']:.2f}, {delta_resid:+.2f}"
    removed = "duration regressed out of both inside each training fold"
    if delta >= PADDED_WIN and delta_resid < PADDED_WIN and dur:
        win.update(through_duration=True, fail=True)
        fails.append(f"the padded store scores {delta:+.2f} higher than the exact one, and the advantage vanishes "
                     f"with {removed} ({nums}): pooling over padding encodes clip duration, which predicts the "
                     f"label ({dur_words})")
        advice.append("do not read the padded pipeline's advantage as a better representation: keep true-frame "
                      "pooling and report the duration-only score beside it")
    elif delta >= PADDED_WIN and delta_resid < PADDED_WIN:
        warns.append(f"the padded store scores {delta:+.2f} higher, and the advantage vanishes with {removed} "
                     f"({nums}), although duration alone is not a significant confound")
        advice.append("the padded store's advantage rides on clip duration: compare true-frame pooling with "
                      "duration balanced across classes")
    elif delta >= PADDED_WIN:
        win["note"] = (f"; the padded store scores {delta:+.2f} higher and keeps {delta_resid:+.2f} with {removed}, "
                       "so the advantage is not (only) duration")
    else:
        win["note"] = f"; with {removed}: {nums}"
    name = f"padded store {pad.path} ({_recipe_words(pad.attrs.get('padding_recipe'))}; {len(common)} items)"
    return name, scores, shares, win

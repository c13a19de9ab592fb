"""Step 1, data sanity: can these items be cross-validated at all, and what is odd about them?

Checks (FAIL unless marked WARN):

* no labelled items with status ok; only one class; folds impossible (:class:`FoldError`, e.g. a
  class with one speaker) -> FAIL, and the later steps are skipped;
* items with status ok but 0 frames;
* identical audio (same ``sha256``) under different labels;
* WARN: items with status != ok (skipped), ok items without a label (skipped), ok items with only
  1-2 frames, identical audio under several ids (same label), a class with fewer speakers than
  folds, no speaker groups, a majority class above 80 % of the items.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from featstore.cv import FoldError, make_folds
from featstore.store import OK
from probes.doctor.result import FAIL, PASS, WARN, Step, pct
from probes.doctor.view import Table

NAME = "data sanity"
#: a majority class above this share of the items is worth a warning
MAJORITY_SHARE = 0.8


def run(table: Table) -> tuple[Step, bool]:
    """The verdict and whether the later steps can run."""
    status, nfr = table.status, table.num_frames
    labels, groups = table.labels, table.groups
    ok = table.ok
    labelled = labels != ""
    use = table.usable
    rows = np.flatnonzero(use)
    ev: dict[str, Any] = {"items": table.n_items, "usable_items": int(use.sum()),
                          "status_not_ok": int((status != OK).sum()),
                          "unlabelled": int((ok & ~labelled).sum()), "layers": len(table.layers)}
    problems, warns, fatal = [], [], []
    bad_status = pd.Series(status[status != OK]).value_counts().to_dict()
    if bad_status:
        ev["status_counts"] = {k: int(v) for k, v in bad_status.items()}
        codes = ", ".join(f"{k}: {v}" for k, v in bad_status.items())
        warns.append(f"{int((status != OK).sum())} items have status != ok ({codes}) and are skipped")
    if ev["unlabelled"]:
        warns.append(f"{ev['unlabelled']} items have no label and are skipped")
    short = (nfr <= 2) & (status == OK) & (nfr > 0)
    ev["clips_0_2_frames"] = int((nfr <= 2).sum())
    if short.any():
        warns.append(f"{int(short.sum())} ok items have only 1-2 frames (pooling sees almost nothing)")
    zero_ok = (status == OK) & (nfr == 0)
    if zero_ok.any():
        problems.append(f"{int(zero_ok.sum())} items have status ok but 0 frames")
    # duplicated audio
    has = (table.sha != "") & use
    dup_groups = conflict = cross_group = 0
    if has.any():
        df = pd.DataFrame({"sha": table.sha[has], "label": labels[has], "group": groups[has]})
        sizes = df.groupby("sha").size()
        dup = sizes[sizes > 1].index
        dup_groups = len(dup)
        if dup_groups:
            sub = df[df["sha"].isin(dup)].groupby("sha")
            conflict = int((sub["label"].nunique() > 1).sum())
            cross_group = int((sub["group"].nunique() > 1).sum())
    ev.update(duplicated_audio=dup_groups, duplicated_audio_conflicting_labels=conflict,
              duplicated_audio_across_speakers=cross_group)
    if conflict:
        problems.append(f"{conflict} identical clips (same sha256) carry different labels")
    elif dup_groups:
        warns.append(f"{dup_groups} clips occur more than once (same sha256 under several ids)")
    # classes and speakers
    lab, grp = labels[rows], groups[rows]
    classes = sorted(set(lab.tolist()))
    counts = {c: int((lab == c).sum()) for c in classes}
    ev["class_counts"] = counts
    ev["class_ratios"] = {c: counts[c] / max(1, len(lab)) for c in classes}
    has_groups = bool((grp != "").any())
    spk = {c: len(set(grp[lab == c]) - {""}) for c in classes}
    ev["speakers"] = len(set(grp) - {""})
    ev["speakers_per_class"] = spk
    ev["speakers_with_several_labels"] = (int((pd.Series(lab).groupby(grp).nunique() > 1).sum())
                                          if has_groups else 0)
    if len(rows) == 0:
        fatal.append("no labelled items with status ok")
    elif len(classes) < 2:
        fatal.append(f"only one class ({classes[0]!r}) among the usable items")
    else:
        if has_groups:
            few = [c for c in classes if spk[c] < table.cv]
            if few:
                warns.append(f"class {few[0]!r} has {spk[few[0]]} speakers, fewer than the {table.cv} folds")
        else:
            warns.append("the store has no speaker groups")
        share = max(counts.values()) / len(lab)
        if share > MAJORITY_SHARE:
            warns.append(f"the majority class holds {pct(share)} of the items (see 'class imbalance')")
    if not fatal:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                make_folds(lab, grp, table.cv, table.seed)
            except FoldError as exc:
                fatal.append(str(exc))
    msg_counts = ", ".join(f"{c} {counts[c]} ({pct(ev['class_ratios'][c])}, {spk[c]} spk)" for c in classes)
    if fatal or problems:
        advice = ("fix the manifest (labels, one label per identical clip) and re-extract, or drop the "
                  "offending rows" if not fatal else
                  "a probe needs two or more classes, each with labelled, ok items from two or more speakers")
        step = Step(NAME, FAIL, ev, f"{'; '.join(fatal + problems)}. Classes: {msg_counts}", advice)
    elif warns:
        step = Step(NAME, WARN, ev, "; ".join(warns) + f". Classes: {msg_counts}",
                    "check the skipped items; the remaining steps use the usable items only")
    else:
        step = Step(NAME, PASS, ev, f"{len(lab)} usable items, {ev['speakers']} speakers. Classes: {msg_counts}")
    return step, not fatal

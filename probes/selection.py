"""Headline selection: which configuration a sweep reports as "the" score, and how it was chosen.

Choosing the best of many configurations on the folds that score them inflates the score (the
*naive best*). Two honest-to-a-degree alternatives, each named for what it is wherever it is printed:

* :func:`nested_selection` -- **true nested cross-validation**: for outer fold ``f`` the
  configuration is chosen by its mean balanced accuracy over inner folds built from ``f``'s
  *training* speakers only (``featstore.cv.nested_folds``), every inner model fit on inner-training
  items only; the chosen configuration's score on ``f`` (its model fit on all of ``f``'s training
  items) is recorded. Nothing of fold ``f`` enters its selection.
* :func:`other_folds_selection` -- **selection on other outer folds, not nested**: for outer fold
  ``f`` the configuration with the best mean score on the *other* outer folds is scored on ``f``.
  It costs nothing extra, but the models behind those other-fold scores were trained with ``f``'s
  items, so the selection is not independent of the scored fold.

Both break ties (after rounding to 12 decimals) by the smallest configuration key, and both take the
folds of one store -- or of several stores whose folds are identical (same items in the same test
and inner folds); fold indices of stores whose folds differ are never mixed (``probes.sweep``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

NESTED = "nested"
OTHER_FOLDS = "other-folds"


def excludes_note(excluded: list[str], labels: dict[str, str] | None = None) -> str:
    """Why some stores of a sweep are not headline candidates (controls, padded-recipe stores):
    one sentence, without the final full stop, for the sweep's log and its report."""
    labels = labels or {}
    return ("the headline and the naive best are chosen among trained, padding-exact stores only; "
            + ", ".join(labels.get(n, n) for n in excluded) + " are shown beside them")


def describe(method: str, inner_cv: int | None = None, n_configs: int | None = None,
             scope: str | None = None) -> str:
    """One line naming the selection (printed beside every headline); ``scope`` says which
    configurations were candidates when not all of them."""
    among = f"among {n_configs} configurations" if n_configs else "among the configurations"
    if scope:
        among += f" ({scope})"
    if method == NESTED:
        return (f"true nested CV: the configuration is chosen {among} by {inner_cv}-fold inner CV on each "
                "outer fold's training speakers only, then scored on that outer fold")
    return (f"selection on other outer folds — not nested: the configuration is chosen {among} by its mean "
            "on the other outer folds, whose models were trained with the scored fold's items")


def _choose(means: pd.Series) -> str:
    means = means.round(12).sort_index()  # float noise must not break ties; ties -> smallest key
    return str(means.index[int(np.argmax(means.to_numpy()))])


def other_folds_selection(folds: pd.DataFrame, metric: str = "balanced_accuracy") -> dict:
    """``{"bacc", "folds": [{fold, config, selection_score, score}]}`` of the not-nested selection.

    ``folds`` has one row per (config, fold) with ``metric``.
    """
    table = folds.pivot_table(index="config", columns="fold", values=metric, aggfunc="first").sort_index()
    per_fold = []
    for f in table.columns:
        means = table.drop(columns=f).mean(axis=1, skipna=True)
        means = means[table[f].notna() & means.notna()]
        if not len(means):
            continue
        best = _choose(means)
        per_fold.append({"fold": int(f), "config": best, "selection_score": float(means[best]),
                         "score": float(table.loc[best, f])})
    bacc = float(np.mean([p["score"] for p in per_fold])) if per_fold else float("nan")
    return {"method": OTHER_FOLDS, "bacc": bacc, "folds": per_fold}


def nested_selection(inner: pd.DataFrame, outer: pd.DataFrame, metric: str = "balanced_accuracy") -> dict:
    """``{"bacc", "folds": [{fold, config, selection_score, score}]}`` of true nested CV.

    ``inner`` has one row per (config, fold, inner_fold) with the inner test score ``metric`` (fold =
    the outer fold whose training part the inner folds split); ``outer`` one row per (config, fold)
    with the outer score. A configuration is eligible for fold ``f`` when it has an outer score on
    ``f`` and at least one inner score.
    """
    scores = outer.pivot_table(index="config", columns="fold", values=metric, aggfunc="first")
    per_fold = []
    for f, part in inner.groupby("fold", sort=True):
        means = part.groupby("config")[metric].mean()
        means = means[means.notna()]
        if f in scores.columns:
            means = means[means.index.isin(scores.index[scores[f].notna()])]
        else:
            means = means.iloc[:0]
        if not len(means):
            continue
        best = _choose(means)
        per_fold.append({"fold": int(f), "config": best, "selection_score": float(means[best]),
                         "score": float(scores.loc[best, f]), "n_inner": int(part["inner_fold"].nunique())})
    bacc = float(np.mean([p["score"] for p in per_fold])) if per_fold else float("nan")
    return {"method": NESTED, "bacc": bacc, "folds": per_fold}

"""`probes doctor`: the expert's debugging order for a probing pipeline, run as one command.

:func:`run_doctor` checks a store in a fixed order and gives each step a verdict (``pass``,
``warn``, ``fail`` or ``skip``) with its evidence (numbers), a message and one line of advice:

1. **data sanity** - class counts, speakers per class, items with status != ok, clips with 0-2
   frames, duplicated audio (the same ``sha256`` under several ids, worse under several labels);
2. **confounds** - does clip duration alone, or loudness alone, predict the label (speaker-grouped
   CV with a permutation null)? How well do the features identify the speaker, and how much would an
   ungrouped CV gain from remembering speakers?
3. **fold sanity** - per-fold class counts, classes missing from a fold, speaker overlap between
   train and test (must be 0), identical audio on both sides of a fold, and whether the ``group``
   column holds speakers at all (see "What a wrong group column looks like" below);
4. **tiny-subset overfit** - ~10 items per class; logistic regression, xgboost, the attentive MLP
   and the weighted-layers probe must reach ~100 % training accuracy. Failing that points to a
   pipeline bug: NaN/inf or constant features, or labels that do not belong to their items (wide
   features can memorise even shuffled labels, so misaligned labels mostly show in step 5);
5. **label-shuffle control** - a permutation test of the best configuration. When every speaker
   has one label, labels are shuffled *across speakers* (speaker-level shuffle): scikit-learn's
   ``permutation_test_score(groups=...)`` shuffles within groups, which then changes nothing.
   Otherwise labels are shuffled across items. The p-value is selection-aware: each shuffle repeats
   the choice of the best (layer, pooling) among all screened ones (max statistic);
6. **padding and pooling** - true-frame mean pooling vs the same clip mean-pooled after zero padding
   to a fixed length (``mean(true frames) * T / P``, what a pad-to-1-s pipeline computes) vs segment
   pooling; frames that the audio cannot explain (padding stored as frames), trailing frames that are
   identical across items, the in-model damage recorded by extraction's padding audit, a stale
   ``pooled/`` cache, padded pooling that wins only by encoding duration, and collapse (a probe
   predicting one class for > 90 % of items);
7. **layer profile** - the best layer per pooling, how flat the curve is, and, given a baseline
   store (e.g. log-Mel), whether the model beats it (paired speaker bootstrap);
8. **class imbalance** (last) - the best configuration with and without balanced class weights,
   with per-class recall.

When a step fails or warns because an earlier one failed, ``caused_by`` names that step.

Probes and scores. To stay fast, the layer screen (every layer x {mean, stats}), the permutation
nulls, the confound tests and the speaker test use a closed-form *screen probe*: shrinkage LDA (equal
class priors) on the first :data:`SCREEN_COMPONENTS` principal components of the standardised pooled
vectors (the PCA sees no labels). Its predictions are linear in the one-hot labels, so all
permutations cost one matrix product. Confirmatory numbers (best configuration, pooling ablation,
class weighting, baseline comparison) come from the sweep's logistic-regression probe (``C=1``) on the
full pooled vectors. Every score is the balanced accuracy of the out-of-fold predictions of all items
on the speaker-grouped folds of :func:`probes.cv.make_folds`; chance is ``1 / n_classes``.

What a wrong group column looks like. Folds built from the ``group`` column never share a group,
so a column that is not the speaker (e.g. the item id) cannot be caught by counting overlaps. What is
detectable: (a) identical audio (``sha256``) in train and test of a fold; (b) a ``group`` equal to the
item id, or groups of one item each; (c) with such groups, *hidden speakers*: items that form tight
clusters of near-identical feature vectors (nearest neighbour much closer than the typical distance).
Doctor then holds out whole clusters (average-linkage pseudo-speakers) instead of the given groups;
when the score drops by >= 0.10 the folds leak speakers and the step fails. Groups that mix a few
speakers, or a speaker split over two group names that also differ in recording conditions, are not
detectable from the store.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featstore.store import OK, Store, open_store
from featstore.cv import FoldError, FoldWarning, describe_folds, make_folds
from probes.metrics import bacc_from_confusion, confusion, group_confusions

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STATUSES = (PASS, WARN, FAIL, SKIP)
STEPS = (
    "data sanity", "confounds", "fold sanity", "tiny-subset overfit", "label-shuffle control",
    "padding and pooling", "layer profile", "class imbalance",
)
#: earlier steps whose failure explains a later step's failure (in order of precedence)
DEPENDS: dict[str, tuple[str, ...]] = {
    "confounds": ("data sanity",),
    "fold sanity": ("data sanity",),
    "tiny-subset overfit": ("data sanity",),
    "label-shuffle control": ("data sanity", "tiny-subset overfit", "fold sanity"),
    "padding and pooling": ("data sanity", "tiny-subset overfit", "label-shuffle control"),
    "layer profile": ("data sanity", "tiny-subset overfit", "label-shuffle control", "padding and pooling"),
    "class imbalance": ("data sanity", "tiny-subset overfit", "label-shuffle control", "padding and pooling"),
}
#: principal components kept for the screen probe
SCREEN_COMPONENTS = 64
#: shrinkage of the screen probe's covariance towards its mean variance
SHRINKAGE = 0.2
#: significance level of the permutation tests
ALPHA = 0.05
#: a probe that predicts one class for more than this share of items has collapsed
COLLAPSE_SHARE = 0.9
#: items per class in the tiny-subset overfit
TINY_PER_CLASS = 10
#: fixed length (seconds) of the simulated pad-to-fixed-length pipeline (or the longest clip)
PAD_SECONDS = 1.0
#: speaker-like column names that should be the group column
SPEAKER_COLUMNS = ("speaker", "speaker_id", "spk", "spk_id", "subject", "participant", "talker", "child", "patient")
#: items used for the nearest-neighbour tests (a seeded subsample beyond that)
MAX_NEIGHBOUR_ITEMS = 3000


class DoctorError(ValueError):
    """Doctor cannot run with these inputs (a user error: missing file, bad option)."""


@dataclass
class Step:
    """The verdict of one step: ``status`` in pass/warn/fail/skip, ``evidence`` numbers, a message
    in plain words, one line of advice, and the earlier step that caused a failure (or None)."""

    name: str
    status: str
    evidence: dict = field(default_factory=dict)
    message: str = ""
    advice: str = ""
    caused_by: str | None = None


class DoctorReport(list):
    """The steps in order (a list of :class:`Step`) plus the run's context.

    ``store``/``baseline``: paths; ``best``: the best configuration found (layer, pooling, scope,
    scores); ``out_dir``: where :func:`write_report` put ``doctor.md``; ``figures``: PNG paths.
    """

    def __init__(self, steps: Sequence[Step] = (), store: str = "", baseline: str | None = None):
        super().__init__(steps)
        self.store = store
        self.baseline = baseline
        self.best: dict = {}
        self.notes: list[str] = []
        self.out_dir: Path | None = None
        self.figures: dict[str, Path] = {}
        self.seconds = 0.0
        self._profile: dict = {}

    def step(self, name: str) -> Step:
        for s in self:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def failed(self) -> list[Step]:
        return [s for s in self if s.status == FAIL]

    @property
    def exit_code(self) -> int:
        """1 when any step failed, else 0 (usable to gate scripts)."""
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return {
            "store": self.store, "baseline": self.baseline, "best": self.best, "notes": self.notes,
            "seconds": round(self.seconds, 2), "exit_code": self.exit_code,
            "steps": [asdict(s) for s in self],
            "figures": {k: str(v) for k, v in self.figures.items()},
        }


# ---------------------------------------------------------------------------------------------
# Small numeric helpers
# ---------------------------------------------------------------------------------------------
def _r(x: Any, digits: int = 3) -> Any:
    """Round for evidence (NaN -> None, numpy -> python)."""
    if isinstance(x, dict):
        return {str(k): _r(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, digits) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else round(float(x), digits)
    return x


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _oof_bacc(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(bacc_from_confusion(confusion(y, pred, k)))


def _recalls(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    conf = confusion(y, pred, len(classes))
    sup = conf.sum(axis=1)
    return {c: float(conf[i, i] / sup[i]) if sup[i] else float("nan") for i, c in enumerate(classes)}


def _collapse(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, int, bool]:
    """(largest predicted share, that class, collapsed?) - collapsed when > COLLAPSE_SHARE of items
    get one class that is clearly rarer in truth."""
    share = np.bincount(pred, minlength=k) / max(1, len(pred))
    c = int(share.argmax())
    true_share = float(np.mean(y == c)) if len(y) else 0.0
    return float(share[c]), c, bool(share[c] > COLLAPSE_SHARE and share[c] > true_share + 0.05)


def screen_features(X: np.ndarray, n_components: int = SCREEN_COMPONENTS, seed: int = 0) -> np.ndarray:
    """Standardise (zero-variance columns stay 0) and keep the first principal components."""
    X = np.asarray(X, dtype=np.float64)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    Z = (X - mu) / np.where(sd > 1e-12, sd, 1.0)
    Z[:, sd <= 1e-12] = 0.0
    k = min(n_components, Z.shape[0] - 1, Z.shape[1])
    if Z.shape[1] <= n_components or k < 1:
        return Z
    from sklearn.utils.extmath import randomized_svd

    U, S, _ = randomized_svd(Z, k, n_iter=3, random_state=seed)
    return U * S


def lda_cv_predict(X: np.ndarray, Y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   n_classes: int) -> np.ndarray:
    """Out-of-fold predictions of the screen probe for several label vectors at once.

    ``Y`` is ``(P, n)`` integer labels (row 0 usually the real ones). Per fold: shrinkage LDA with
    equal priors, ``score_k(x) = x S^-1 m_k - m_k S^-1 m_k / 2`` on train-centred features; the class
    means are linear in the one-hot labels, so all P label vectors share one solve. A class absent from
    a training fold is never predicted. Returns ``(P, n)`` predictions (-1 for items in no test fold).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.int64))
    P, n = Y.shape
    pred = np.full((P, n), -1, dtype=np.int64)
    for tr, te in folds:
        mu = X[tr].mean(axis=0)
        Xc, Xt = X[tr] - mu, X[te] - mu
        d = X.shape[1]
        S = Xc.T @ Xc / max(1, len(tr))
        S = (1 - SHRINKAGE) * S + (SHRINKAGE * np.trace(S) / max(1, d) + 1e-9) * np.eye(d)
        onehot = np.zeros((len(tr), P, n_classes))
        onehot[np.arange(len(tr))[:, None], np.arange(P)[None, :], Y[:, tr].T] = 1.0
        counts = onehot.sum(axis=0)
        onehot /= np.maximum(counts, 1.0)
        means = Xc.T @ onehot.reshape(len(tr), P * n_classes)
        Z = np.linalg.solve(S, means)
        scores = (Xt @ Z - 0.5 * (means * Z).sum(axis=0)).reshape(len(te), P, n_classes)
        scores[:, counts == 0] = -np.inf
        pred[:, te] = scores.argmax(axis=2).T
    return pred


def _baccs(Y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy of each row of ``(P, n)`` predictions against ``(P, n)`` labels."""
    P = Y.shape[0]
    idx = (np.arange(P)[:, None] * k + Y) * k + pred
    conf = np.bincount(idx.ravel(), minlength=P * k * k).reshape(P, k, k)
    return bacc_from_confusion(conf)


def _shuffles(y: np.ndarray, groups: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, str]:
    """``(n, len(y))`` shuffled labels and the kind of shuffle used.

    ``speaker-level`` when every speaker has one label and speakers hold several items (labels
    permuted across speakers); ``item-level`` otherwise.
    """
    rng = np.random.default_rng(seed)
    names, g = np.unique(groups.astype(str), return_inverse=True)
    per_group = np.array([len(np.unique(y[g == j])) for j in range(len(names))])
    if len(names) < len(y) and (per_group == 1).all() and (groups != "").all():
        lab = np.zeros(len(names), dtype=np.int64)
        lab[g] = y
        out = np.stack([rng.permutation(lab)[g] for _ in range(n)]) if n else np.zeros((0, len(y)), np.int64)
        return out, "speaker-level"
    out = np.stack([rng.permutation(y) for _ in range(n)]) if n else np.zeros((0, len(y)), np.int64)
    return out, "item-level"


def _perm_test(X: np.ndarray, y: np.ndarray, shuffled: np.ndarray, folds,
               k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(observed score, null scores, observed predictions) of the screen probe."""
    Y = np.vstack([y[None, :], shuffled])
    pred = lda_cv_predict(X, Y, folds, k)
    scores = _baccs(Y, pred, k)
    return float(scores[0]), scores[1:], pred[0]


def _p_value(observed: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))) if len(null) else float("nan")


def _logreg_oof(X: np.ndarray, y: np.ndarray, folds, k: int, class_weight: str | None = None,
                seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of the sweep's logistic-regression probe (C=1, standardised)."""
    from probes.estimators import make_probe

    pred = np.full(len(y), -1, dtype=np.int64)
    for tr, te in folds:
        classes = np.unique(y[tr])
        if len(classes) < 2:
            pred[te] = classes[0]
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make_probe("logreg", class_weight=class_weight, random_state=seed).fit(X[tr], y[tr])
        pred[te] = model.predict(X[te])
    return pred


def _speaker_bootstrap_diff(y, pred_a, pred_b, groups, k, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of bacc(a) - bacc(b), resampling speakers (paired)."""
    groups = np.asarray(groups, dtype=object).astype(str).copy()
    empty = groups == ""
    groups[empty] = [f"__item_{i}" for i in np.flatnonzero(empty)]
    ca = group_confusions(y, pred_a, groups, k).astype(np.float64)
    cb = group_confusions(y, pred_b, groups, k).astype(np.float64)
    G = ca.shape[0]
    if G < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
    da = bacc_from_confusion((w @ ca.reshape(G, -1)).reshape(n_boot, k, k))
    db = bacc_from_confusion((w @ cb.reshape(G, -1)).reshape(n_boot, k, k))
    lo, hi = np.nanpercentile(da - db, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Reading and pooling (always from the frames: the pooled/ cache is checked, never trusted)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Pooled:
    """Pooled vectors of one layer for the usable rows."""

    mean: np.ndarray          # scope auto (segment where the store has segments), true frames
    std: np.ndarray
    clip_mean: np.ndarray     # clip scope
    clip_first: np.ndarray
    clip_last: np.ndarray
    clip_center: np.ndarray

    @property
    def stats(self) -> np.ndarray:
        return np.concatenate([self.mean, self.std], axis=1)

    def get(self, pooling: str) -> np.ndarray:
        return self.stats if pooling == "stats" else self.mean


def _pool_layer(store: Store, layer: int, rows: np.ndarray, auto: tuple, clip: tuple) -> _Pooled:
    data = store.layer(layer)
    d = data.shape[1]
    n = len(rows)
    out = {name: np.zeros((n, d), dtype=np.float32)
           for name in ("mean", "std", "clip_mean", "clip_first", "clip_last", "clip_center")}
    same = np.array_equal(auto[0], clip[0]) and np.array_equal(auto[1], clip[1])
    for j, i in enumerate(rows):
        a, b = int(clip[0][i]), int(clip[1][i])
        f = data[a:b].astype(np.float64)
        out["clip_mean"][j] = f.mean(axis=0)
        out["clip_first"][j] = f[0]
        out["clip_last"][j] = f[-1]
        out["clip_center"][j] = f[(len(f) - 1) // 2]
        if not same:
            f = data[int(auto[0][i]) : int(auto[1][i])].astype(np.float64)
        out["mean"][j] = f.mean(axis=0)
        out["std"][j] = f.std(axis=0)
    return _Pooled(**out)


def _cache_mismatch(store: Store, layer: int, rows: np.ndarray, pooled: _Pooled, auto_scope: str) -> dict[str, float]:
    """Relative max difference between ``pooled/<key>/NN`` and the frames' pooling, per key checked."""
    if "pooled" not in store.h5:
        return {}
    mine = {"clip-mean": pooled.clip_mean, "clip-first": pooled.clip_first, "clip-last": pooled.clip_last,
            "clip-center": pooled.clip_center, f"{auto_scope}-mean": pooled.mean,
            f"{auto_scope}-stats": pooled.stats}
    out = {}
    for key, ref in mine.items():
        cached = store.pooled(key, layer)
        if cached is None:
            continue
        if cached.shape[0] != store.num_items or cached.shape[1] != ref.shape[1]:
            out[f"{key}/{layer:02d}"] = float("inf")
            continue
        diff = np.abs(cached[rows].astype(np.float64) - ref)
        scale = float(np.abs(ref).max()) or 1.0
        out[f"{key}/{layer:02d}"] = float(np.nanmax(diff) / scale) if diff.size else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Doctor:
    def __init__(self, store_path: Path, baseline: Path | None, layers: Sequence[int] | None, n_permutations: int,
                 cv: int, seed: int, log: Callable[[str], None]):
        self.path, self.baseline_path = store_path, baseline
        self.req_layers = None if layers is None else [int(k) for k in layers]
        self.n_perm, self.cv, self.seed, self.log = n_permutations, cv, seed, log
        self.steps: dict[str, Step] = {}
        self.report = DoctorReport(store=str(store_path), baseline=None if baseline is None else str(baseline))

    # -- helpers -----------------------------------------------------------------------------
    def add(self, name: str, status: str, evidence: dict, message: str, advice: str = "",
            caused_by: str | None = None) -> Step:
        step = Step(name, status, _r(evidence), message, advice, caused_by)
        if status in (FAIL, WARN, SKIP) and caused_by is None:
            step.caused_by = self.upstream_failure(name)
        self.steps[name] = step
        return step

    def upstream_failure(self, name: str) -> str | None:
        for dep in DEPENDS.get(name, ()):
            s = self.steps.get(dep)
            if s is not None and s.status in (FAIL, SKIP) and (s.status == FAIL or s.caused_by is None):
                return dep
        return None

    def skip_rest(self, reason: str, cause: str) -> None:
        for name in STEPS:
            if name not in self.steps:
                self.steps[name] = Step(name, SKIP, {}, f"not run: {reason}", f"fix '{cause}' first", cause)

    # -- main --------------------------------------------------------------------------------
    def run(self) -> DoctorReport:
        t0 = time.perf_counter()
        try:
            store = open_store(self.path)
        except (OSError, ValueError) as exc:
            raise DoctorError(str(exc)) from None
        with store:
            self.store = store
            self._run(store)
        for name in STEPS:
            self.report.append(self.steps[name])
        self.report.seconds = time.perf_counter() - t0
        return self.report

    def _run(self, store: Store) -> None:
        self.log("1/8 data sanity")
        if not self.data_sanity(store):
            self.skip_rest("the data cannot be cross-validated", "data sanity")
            return
        self.log("pooling layers " + ",".join(map(str, self.layers)))
        self.pool(store)
        if self.fatal_features:
            self.log("4/8 tiny-subset overfit")
            self.overfit(store)
            self.skip_rest("no usable features", "tiny-subset overfit")
            return
        self.log("screening layers x poolings (with label shuffles)")
        self.screen()
        self.log("2/8 confounds")
        self.confounds()
        self.log("3/8 fold sanity")
        self.fold_sanity(store)
        self.log("4/8 tiny-subset overfit")
        self.overfit(store)
        self.log("5/8 label-shuffle control")
        self.shuffle_control()
        self.log("6/8 padding and pooling")
        self.padding(store)
        self.log("7/8 layer profile")
        self.layer_profile()
        self.log("8/8 class imbalance")
        self.imbalance()

    # -- 1 data sanity -------------------------------------------------------------------------
    def data_sanity(self, store: Store) -> bool:
        items = store.items
        self.items = items
        n_all = len(items)
        status = items["status"].astype(str).to_numpy()
        nfr = items["num_frames"].to_numpy().astype(np.int64)
        labels = np.array(["" if v is None else str(v).strip() for v in items["label"]], dtype=object)
        groups = np.array(["" if v is None else str(v).strip() for v in items["group"]], dtype=object)
        ok = (status == OK) & (nfr > 0)
        labelled = labels != ""
        use = ok & labelled
        self.rows = np.flatnonzero(use)
        have = store.layer_ids
        if self.req_layers is None:
            self.layers = list(have)
        else:
            missing = [k for k in self.req_layers if k not in have]
            if missing:
                raise DoctorError(f"the store has no layer {','.join(map(str, missing))} (it has "
                                  f"{have[0]}..{have[-1]})" if have else "the store has no layers")
            self.layers = sorted(set(self.req_layers))
        ev: dict[str, Any] = {"items": n_all, "usable_items": int(use.sum()),
                              "status_not_ok": int((status != OK).sum()),
                              "unlabelled": int((ok & ~labelled).sum()), "layers": len(self.layers)}
        problems, warns, fatal = [], [], []
        bad_status = items.loc[status != OK, "status"].astype(str).value_counts().to_dict()
        if bad_status:
            ev["status_counts"] = {k: int(v) for k, v in bad_status.items()}
            codes = ", ".join(f"{k}: {v}" for k, v in bad_status.items())
            warns.append(f"{int((status != OK).sum())} items have status != ok ({codes}) and are skipped")
        if ev["unlabelled"]:
            warns.append(f"{ev['unlabelled']} items have no label and are skipped")
        short = (nfr <= 2) & (status == OK)
        ev["clips_0_2_frames"] = int(((nfr <= 2)).sum())
        if short.any():
            warns.append(f"{int(short.sum())} ok items have only 1-2 frames (pooling sees almost nothing)")
        zero_ok = (status == OK) & (nfr == 0)
        if zero_ok.any():
            problems.append(f"{int(zero_ok.sum())} items have status ok but 0 frames")
        # duplicated audio
        sha = items["sha256"].astype(str).to_numpy()
        has = (sha != "") & use
        dup_groups = conflict = cross_group = 0
        if has.any():
            import pandas as pd

            df = pd.DataFrame({"sha": sha[has], "label": labels[has], "group": groups[has]})
            g = df.groupby("sha")
            sizes = g.size()
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
        lab = labels[self.rows]
        grp = groups[self.rows]
        self.classes = sorted(set(lab.tolist()))
        counts = {c: int((lab == c).sum()) for c in self.classes}
        ev["class_counts"] = counts
        ev["class_ratios"] = {c: counts[c] / max(1, len(lab)) for c in self.classes}
        self.has_groups = bool((grp != "").any())
        spk = {c: len(set(grp[lab == c]) - {""}) for c in self.classes}
        ev["speakers"] = len(set(grp) - {""})
        ev["speakers_per_class"] = spk
        mixed = 0
        if self.has_groups:
            import pandas as pd

            mixed = int((pd.Series(lab).groupby(grp).nunique() > 1).sum())
        ev["speakers_with_several_labels"] = mixed
        if len(self.rows) == 0:
            fatal.append("no labelled items with status ok")
        elif len(self.classes) < 2:
            fatal.append(f"only one class ({self.classes[0]!r}) among the usable items")
        else:
            if self.has_groups:
                few = [c for c in self.classes if spk[c] < self.cv]
                if few:
                    warns.append(f"class {few[0]!r} has {spk[few[0]]} speakers, fewer than the {self.cv} folds")
            else:
                warns.append("the store has no speaker groups")
            share = max(counts.values()) / len(lab)
            if share > 0.8:
                warns.append(f"the majority class holds {_pct(share)} of the items (see 'class imbalance')")
        if not fatal:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    make_folds(lab, grp, self.cv, self.seed)
                except FoldError as exc:
                    fatal.append(str(exc))
        self.labels_str = lab
        self.groups = grp
        if not fatal:
            code = {c: i for i, c in enumerate(self.classes)}
            self.y = np.array([code[v] for v in lab], dtype=np.int64)
            self.k = len(self.classes)
        msg_counts = ", ".join(f"{c} {counts[c]} ({_pct(ev['class_ratios'][c])}, {spk[c]} spk)" for c in self.classes)
        if fatal or problems:
            msg = "; ".join(fatal + problems)
            advice = ("fix the manifest (labels, one label per identical clip) and re-extract, or drop the "
                      "offending rows" if not fatal else
                      "a probe needs two or more classes, each with labelled, ok items from two or more speakers")
            self.add("data sanity", FAIL, ev, f"{msg}. Classes: {msg_counts}", advice)
        elif warns:
            self.add("data sanity", WARN, ev, "; ".join(warns) + f". Classes: {msg_counts}",
                     "check the skipped items; the remaining steps use the usable items only")
        else:
            self.add("data sanity", PASS, ev,
                     f"{len(lab)} usable items, {ev['speakers']} speakers. Classes: {msg_counts}")
        if fatal:
            return False
        self.num_samples = items["num_samples"].to_numpy().astype(np.float64)[self.rows]
        self.num_frames = nfr[self.rows]
        self.rms_db = items["rms_db"].to_numpy().astype(np.float64)[self.rows]
        self.sha = sha[self.rows]
        self.ids = items["id"].astype(str).to_numpy()[self.rows]
        return True

    # -- pooling + folds -------------------------------------------------------------------------
    def pool(self, store: Store) -> None:
        from probes.pooling import item_spans, resolve_scope

        notes = self.report.notes
        clip = item_spans(store, "clip")
        try:
            self.scope = resolve_scope(store, "auto")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                auto = item_spans(store, self.scope)
            for w in caught:
                notes.append(str(w.message))
        except ValueError as exc:
            notes.append(f"segment pooling unavailable ({exc}); pooling over whole clips")
            self.scope, auto = "clip", clip
        self.pooled: dict[int, _Pooled] = {}
        self.cache_diff: dict[str, float] = {}
        for k in self.layers:
            p = _pool_layer(store, k, self.rows, auto, clip)
            self.pooled[k] = p
            self.cache_diff.update(_cache_mismatch(store, k, self.rows, p, self.scope))
        finite = np.ones(len(self.rows), dtype=bool)
        self.bad_layers = {}
        for k, p in self.pooled.items():
            ok = np.isfinite(p.stats).all(axis=1) & np.isfinite(p.clip_mean).all(axis=1)
            if (~ok).any():
                self.bad_layers[k] = int((~ok).sum())
            finite &= ok
        self.n_nonfinite = int((~finite).sum())
        self.fatal_features = False
        if self.n_nonfinite:
            keep = np.flatnonzero(finite)
            notes.append(f"{self.n_nonfinite} items with NaN/inf features left out of the later steps")
            for k, p in self.pooled.items():
                for name in ("mean", "std", "clip_mean", "clip_first", "clip_last", "clip_center"):
                    setattr(p, name, getattr(p, name)[keep])
            self.rows = self.rows[keep]
            for name in ("labels_str", "groups", "num_samples", "num_frames", "rms_db", "sha", "ids", "y"):
                setattr(self, name, getattr(self, name)[keep])
        present = np.unique(self.y) if len(self.y) else []
        if len(present) < 2:
            self.fatal_features = True
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.folds = make_folds(self.labels_str, self.groups, self.cv, self.seed)
            except FoldError as exc:
                self.fatal_features = True
                notes.append(str(exc))
                return
        self.fold_warnings = [str(w.message) for w in caught if issubclass(w.category, FoldWarning)]

    # -- the screen ------------------------------------------------------------------------------
    def screen(self) -> None:
        y, k = self.y, self.k
        self.shuffled, self.shuffle_kind = _shuffles(y, self.groups, self.n_perm, self.seed)
        self.feats: dict[tuple[int, str], np.ndarray] = {}
        self.screen_scores: dict[tuple[int, str], float] = {}
        self.screen_null: dict[tuple[int, str], np.ndarray] = {}
        for layer in self.layers:
            for pooling in ("mean", "stats"):
                X = screen_features(self.pooled[layer].get(pooling), seed=self.seed)
                obs, null, _ = _perm_test(X, y, self.shuffled, self.folds, k)
                self.feats[(layer, pooling)] = X
                self.screen_scores[(layer, pooling)] = obs
                self.screen_null[(layer, pooling)] = null
        # best: highest screen score; ties -> earlier layer, mean before stats
        self.best_key = max(self.screen_scores, key=lambda c: (round(self.screen_scores[c], 6), -c[0], c[1] == "mean"))
        layer, pooling = self.best_key
        X = self.pooled[layer].get(pooling)
        self.best_pred = _logreg_oof(X, y, self.folds, k, None, self.seed)
        self.best_score = _oof_bacc(y, self.best_pred, k)
        self.chance = 1.0 / k
        self.report.best = {"layer": layer, "pooling": pooling, "scope": self.scope, "probe": "logreg",
                            "balanced_accuracy": round(self.best_score, 4),
                            "screen_balanced_accuracy": round(self.screen_scores[self.best_key], 4),
                            "chance": round(self.chance, 4)}

    # -- 2 confounds -----------------------------------------------------------------------------
    def confounds(self) -> None:
        y, k, folds = self.y, self.k, self.folds
        ev: dict[str, Any] = {"chance": self.chance}
        verdicts: list[tuple[str, str]] = []
        parts = []
        for name, raw in (("duration", self._duration()), ("loudness", self.rms_db)):
            fin = np.isfinite(raw)
            if not fin.any() or np.std(raw[fin]) == 0:
                ev[f"{name}_balanced_accuracy"] = float("nan")
                parts.append(f"{name}: not available")
                continue
            raw = np.where(fin, raw, raw[fin].min())  # e.g. -inf dB of digital silence
            z = (raw - raw.mean()) / raw.std()
            X = np.column_stack([z, z ** 2, z ** 3])
            obs, null, _ = _perm_test(X, y, self.shuffled, folds, k)
            p = _p_value(obs, null)
            ev[f"{name}_balanced_accuracy"] = obs
            ev[f"{name}_shuffled"] = float(np.mean(null)) if len(null) else float("nan")
            ev[f"{name}_p_value"] = p
            excess = obs - self.chance
            sig = p <= ALPHA if len(null) else True  # without shuffles: effect size only
            parts.append(f"{name} alone {obs:.2f} (chance {self.chance:.2f}" + (f", p={p:.3f})" if len(null) else ")"))
            if sig and excess >= 0.20:
                verdicts.append((FAIL, name))
            elif sig and excess >= 0.10:
                verdicts.append((WARN, name))
        # speaker identity from the features and what an ungrouped CV would gain
        spk_msg = ""
        Xb = self.feats[self.best_key]
        _, g = np.unique(self.groups.astype(str), return_inverse=True)
        sizes = np.bincount(g)
        keep = (sizes[g] >= 2) & (self.groups != "")
        if keep.sum() >= 4 and len(np.unique(g[keep])) >= 2:
            from sklearn.model_selection import StratifiedKFold

            gi = np.unique(g[keep], return_inverse=True)[1]
            n_split = int(min(3, np.bincount(gi).min()))
            sk = list(StratifiedKFold(n_split, shuffle=True, random_state=self.seed).split(np.zeros(len(gi)), gi))
            pred = lda_cv_predict(Xb[keep], gi[None, :], sk, int(gi.max()) + 1)[0]
            spk_acc = float(np.mean(pred == gi))
            ev["speaker_id_accuracy"] = spk_acc
            ev["speaker_id_chance"] = 1.0 / (int(gi.max()) + 1)
            uk = None
            if np.bincount(y).min() >= len(self.folds):
                skf = StratifiedKFold(len(self.folds), shuffle=True, random_state=self.seed)
                uk = list(skf.split(np.zeros(len(y)), y))
            if uk is not None:
                ung = _oof_bacc(y, lda_cv_predict(Xb, y[None, :], uk, k)[0], k)
                grp = self.screen_scores[self.best_key]
                ev["label_score_speakers_shared"] = ung
                ev["label_score_speakers_held_out"] = grp
                spk_msg = (f"; the speaker is identified from the features with accuracy {spk_acc:.2f} "
                           f"(chance {ev['speaker_id_chance']:.2f}); with speakers shared between train and test "
                           f"the label scores {ung:.2f} vs {grp:.2f} held out")
                if ung - grp >= 0.2 and grp - self.chance < 0.05:
                    verdicts.append((WARN, "speaker"))
        else:
            spk_msg = "; speaker test not run (no speakers with two or more items)"
        self.confound_sig = {name: st for st, name in verdicts}
        msg = "; ".join(parts) + spk_msg
        if any(v == FAIL for v, _ in verdicts):
            bad = [n for v, n in verdicts if v == FAIL]
            self.add("confounds", FAIL, ev,
                     f"{' and '.join(bad)} alone predict(s) the label: {msg}",
                     f"a probe can score by reading clip {bad[0]}; balance {bad[0]} across classes, pool over "
                     f"segments, or report the {bad[0]}-only score beside every probe score")
        elif verdicts:
            what = [n for _, n in verdicts]
            advice = ("the label is only decodable by recognising speakers: keep speaker-grouped folds and "
                      "question the labels" if what == ["speaker"] else
                      f"{what[0]} carries some label information: report the {what[0]}-only score beside probe scores")
            self.add("confounds", WARN, ev, msg, advice)
        else:
            self.add("confounds", PASS, ev, f"no confound above chance: {msg}")

    def _duration(self) -> np.ndarray | None:
        ns = self.num_samples
        if np.isfinite(ns).all() and (ns > 0).all():
            return np.log(ns)
        return np.log(np.maximum(self.num_frames, 1).astype(np.float64))

    # -- 3 fold sanity ---------------------------------------------------------------------------
    def fold_sanity(self, store: Store) -> None:
        folds = self.folds
        info = describe_folds(folds, self.labels_str, self.groups)
        ev: dict[str, Any] = {"folds": len(folds)}
        test_cols = [f"test_{c}" for c in self.classes]
        train_cols = [f"train_{c}" for c in self.classes]
        ev["per_fold_test_counts"] = {f"fold{int(r['fold'])}": {c: int(r[f'test_{c}']) for c in self.classes}
                                      for _, r in info.iterrows()}
        ev["min_test_count_per_class"] = int(info[test_cols].to_numpy().min())
        miss_test = int((info[test_cols].to_numpy() == 0).any(axis=1).sum())
        miss_train = int((info[train_cols].to_numpy() == 0).any(axis=1).sum())
        ev["folds_missing_a_class_in_test"] = miss_test
        ev["folds_missing_a_class_in_train"] = miss_train
        overlap = int(info["speaker_overlap"].sum()) if self.has_groups else 0
        ev["speaker_overlap"] = overlap
        # identical audio on both sides of a fold
        cross = 0
        has = self.sha != ""
        for tr, te in folds:
            cross += len((set(self.sha[tr][has[tr]]) & set(self.sha[te][has[te]])))
        ev["identical_audio_across_folds"] = cross
        fails = []
        warns = [w for w in self.fold_warnings if self.has_groups or "no speaker groups" not in w]
        advice = ""
        if overlap:
            fails.append(f"{overlap} speakers are in train and test of a fold")
        if cross:
            fails.append(f"{cross} identical clips (same sha256) sit in train and test of a fold")
            advice = "drop duplicated clips (or give them one group) so that identical audio never spans a fold"
        if miss_train:
            fails.append(f"{miss_train} folds have a class missing from training")
        if miss_test:
            warns.append(f"{miss_test} folds have a class missing from the test part")
        # is the group column the speaker?
        _, g = np.unique(self.groups.astype(str), return_inverse=True)
        sizes = np.bincount(g)
        singleton = float(np.mean(sizes[g] == 1)) if self.has_groups else 1.0
        same_as_id = float(np.mean(self.groups.astype(str) == self.ids)) if self.has_groups else 0.0
        ev["items_in_single_item_groups"] = singleton
        ev["group_equals_id"] = same_as_id
        extra = [c for c in store.extra_columns if c.lower() in SPEAKER_COLUMNS]
        for c in extra:
            col = self.items[c].astype(str).to_numpy()[self.rows]
            if len(set(zip(col, self.groups))) != len(set(col)) or len(set(col)) != len(set(self.groups)):
                warns.append(f"the column {c!r} looks like the speaker but differs from the group column")
                advice = advice or f"re-extract with --group-column {c}"
        if singleton >= 0.5 or not self.has_groups:
            leak = self._hidden_speakers(ev)
            desc = ("the store has no speaker groups" if not self.has_groups else
                    "the group column equals the item id" if same_as_id >= 0.99 else
                    f"{_pct(singleton)} of the items are alone in their group")
            if leak is not None and leak >= 0.10:
                fails.append(
                    f"{desc}, and the items form tight clusters of near-identical feature vectors (hidden speakers): "
                    f"holding out whole clusters instead of the groups drops the score from "
                    f"{ev['score_given_groups']:.2f} to {ev['score_cluster_groups']:.2f}, so the folds leak speakers")
                advice = advice or ("set the speaker as the group (--group-column speaker) and re-extract; "
                                    "until then every score is inflated")
            elif leak is not None:
                warns.append(f"{desc}; the items form tight clusters (hidden speakers?), but holding out whole "
                             f"clusters changes the score only from {ev['score_given_groups']:.2f} to "
                             f"{ev['score_cluster_groups']:.2f}")
                advice = advice or "make the group column the speaker (--group-column) to be safe"
            else:
                warns.append(f"{desc}; if speakers recorded several clips, grouped folds cannot keep them apart")
                advice = advice or "make the group column the speaker (--group-column)"
        counts_msg = (f"{len(folds)} folds, min test items per class {ev['min_test_count_per_class']}, "
                      f"speaker overlap {overlap}")
        if fails:
            self.add("fold sanity", FAIL, ev, "; ".join(fails) + f" ({counts_msg})",
                     advice or "rebuild the folds grouped by the true speaker")
        elif warns:
            self.add("fold sanity", WARN, ev, "; ".join(warns) + f" ({counts_msg})",
                     advice or "use fewer folds or more speakers per class")
        else:
            self.add("fold sanity", PASS, ev, counts_msg + ", no duplicated audio across folds")

    def _hidden_speakers(self, ev: dict) -> float | None:
        """Score drop when near-duplicate clusters are held out instead of the given groups (or None)."""
        from scipy.spatial.distance import pdist, squareform

        n = len(self.y)
        rng = np.random.default_rng(self.seed)
        sub = np.sort(rng.choice(n, MAX_NEIGHBOUR_ITEMS, replace=False)) if n > MAX_NEIGHBOUR_ITEMS else np.arange(n)

        def nn_ratio(X: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
            D = squareform(pdist(X))
            np.fill_diagonal(D, np.inf)
            d1 = D.min(axis=1)
            np.fill_diagonal(D, np.nan)
            med = np.nanmedian(D, axis=1)
            ok = med > 0
            return (float(np.median(d1[ok] / med[ok])) if ok.any() else np.inf), D, d1, med

        best_rel, best = np.inf, None
        for layer in self.layers:
            X = self.feats[(layer, "mean")][sub]
            ratio, D, d1, med = nn_ratio(X)
            # reference: the same values with each column shuffled on its own (no clusters left)
            ref = nn_ratio(np.column_stack([rng.permutation(c) for c in X.T]))[0]
            rel = ratio / ref if np.isfinite(ratio) and ref > 0 else np.inf
            if rel < best_rel:
                best_rel, best = rel, (ratio, ref, D, d1, med)
        if best is None:
            return None
        ratio, ref, best_D, best_d1, best_med = best
        ev["nearest_neighbour_ratio"] = ratio
        ev["nearest_neighbour_ratio_unclustered"] = ref
        if best_rel >= 0.7:
            return None
        from sklearn.cluster import AgglomerativeClustering

        D = np.nan_to_num(best_D, nan=0.0)
        tau = float(np.sqrt(np.median(best_d1) * np.median(best_med)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pseudo = AgglomerativeClustering(n_clusters=None, distance_threshold=tau, metric="precomputed",
                                             linkage="average").fit_predict(D)
        ev["cluster_groups"] = int(len(np.unique(pseudo)))
        ys, labels = self.y[sub], self.labels_str[sub]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                f_pseudo = make_folds(labels, pseudo.astype(str), self.cv, self.seed)
                f_given = make_folds(labels, self.groups[sub], self.cv, self.seed)
            except FoldError:
                return None
        X = self.feats[self.best_key][sub]
        given = _oof_bacc(ys, lda_cv_predict(X, ys[None, :], f_given, self.k)[0], self.k)
        clus = _oof_bacc(ys, lda_cv_predict(X, ys[None, :], f_pseudo, self.k)[0], self.k)
        ev["score_given_groups"], ev["score_cluster_groups"] = given, clus
        return given - clus

    # -- 4 tiny-subset overfit -----------------------------------------------------------------
    def overfit(self, store: Store) -> None:
        ev: dict[str, Any] = {"items_nonfinite": self.n_nonfinite}
        if self.bad_layers:
            ev["nonfinite_items_per_layer"] = {str(k): v for k, v in self.bad_layers.items()}
        fails = []
        if self.n_nonfinite:
            fails.append(f"{self.n_nonfinite} items have NaN/inf features (layers "
                         f"{','.join(map(str, self.bad_layers))})")
        if self.fatal_features:
            self.add("tiny-subset overfit", FAIL, ev,
                     "; ".join(fails) or "too few usable items after removing NaN/inf features",
                     "re-extract: NaN/inf frames come from a broken decode, an fp16 overflow or a model bug")
            return
        # constant features
        const = {}
        for layer, p in self.pooled.items():
            sd = p.clip_mean.std(axis=0)
            const[str(layer)] = float(np.mean(sd <= 1e-7 * (1 + np.abs(p.clip_mean).mean(axis=0))))
        ev["constant_dims_share"] = const
        all_const = [k for k, v in const.items() if v >= 0.999]
        if all_const:
            fails.append(f"features are constant across items in layer(s) {','.join(all_const)}")
        # subset: ~10 items per class, spread over speakers
        rng = np.random.default_rng(self.seed)
        pick = []
        for c in range(self.k):
            idx = rng.permutation(np.flatnonzero(self.y == c))
            seen: dict[str, int] = {}
            ranks = []
            for i in idx:  # round-robin over speakers: each speaker's 1st item, then 2nd, ...
                g = self.groups[i] or f"__item_{i}"
                ranks.append(seen.get(g, 0))
                seen[g] = seen.get(g, 0) + 1
            pick.extend(idx[np.argsort(ranks, kind="stable")][:TINY_PER_CLASS])
        pick = np.sort(np.array(pick, dtype=np.int64))
        ys = self.y[pick]
        layer, _ = self.best_key
        ev["subset_items"] = len(pick)
        ev["layer"] = layer
        accs = {}
        X = self.pooled[layer].stats[pick]
        accs["logreg"] = self._train_acc("logreg", X, ys, C=1e4)
        accs["xgb"] = self._train_acc("xgb", X, ys, n_estimators=100, subsample=1.0, colsample_bytree=1.0)
        try:
            from probes.pooling import frame_sequences

            seqs = frame_sequences(store, layer, self.scope, self.rows[pick])
            accs["attn-mlp"] = self._train_acc("attn-mlp", seqs, ys, epochs=60, lr=1e-2, val_fraction=0.0, dropout=0.0)
            dims = {store.layer_dim(k) for k in self.layers}
            if len(self.layers) > 1 and len(dims) == 1:
                Xl = np.stack([self.pooled[k].mean[pick] for k in self.layers], axis=1)
                accs["weighted-layers"] = self._train_acc("weighted-layers", Xl, ys, epochs=60, lr=1e-2,
                                                          val_fraction=0.0, dropout=0.0)
        except ImportError as exc:  # torch missing: the pooled probes still tell
            self.report.notes.append(f"torch probes not checked: {exc}")
        ev["train_accuracy"] = accs
        low = {p: a for p, a in accs.items() if not a >= 0.95}
        acc_msg = ", ".join(f"{p} {a:.2f}" for p, a in accs.items())
        if not accs.get("logreg", 0.0) >= 0.8:
            fails.append(f"logistic regression reaches only {accs.get('logreg', float('nan')):.2f} training accuracy "
                         f"on {len(pick)} items")
        if fails:
            self.add("tiny-subset overfit", FAIL, ev, "; ".join(fails) + f" (training accuracy: {acc_msg})",
                     "a pipeline bug, not a hard task: check that labels belong to their items, that frames are not "
                     "constant (a failed extraction) and free of NaN/inf")
        elif low:
            self.add("tiny-subset overfit", WARN, ev, f"{', '.join(low)} below 95 % training accuracy on "
                     f"{len(pick)} items ({acc_msg})", "check those probes' settings (epochs, learning rate)")
        else:
            self.add("tiny-subset overfit", PASS, ev, f"every probe fits {len(pick)} items ({acc_msg})")

    def _train_acc(self, probe: str, X: Any, y: np.ndarray, **params: Any) -> float:
        from probes.estimators import make_probe

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = make_probe(probe, random_state=self.seed, **params).fit(X, y)
                return float(np.mean(model.predict(X) == y))
            except ValueError as exc:
                self.report.notes.append(f"{probe} could not be fitted on the tiny subset: {exc}")
                return float("nan")

    # -- 5 label-shuffle control ---------------------------------------------------------------
    def shuffle_control(self) -> None:
        key = self.best_key
        obs = self.screen_scores[key]
        ev: dict[str, Any] = {"layer": key[0], "n_permutations": self.n_perm, "chance": self.chance,
                              "logreg_balanced_accuracy": self.best_score, "screen_balanced_accuracy": obs}
        if self.n_perm < 1:
            self.add("label-shuffle control", SKIP, ev, "no permutations requested", "use --n-permutations 100")
            return
        null_best = self.screen_null[key]
        null_max = np.max(np.stack(list(self.screen_null.values())), axis=0)
        obs_max = max(self.screen_scores.values())
        p_fixed = _p_value(obs, null_best)
        p_sel = _p_value(obs_max, null_max)
        ev.update(shuffled_mean=float(null_best.mean()), shuffled_sd=float(null_best.std()),
                  shuffled_max_mean=float(null_max.mean()), p_value=p_sel, p_value_fixed_config=p_fixed,
                  shuffle=1 if self.shuffle_kind == "speaker-level" else 0)
        cfg = f"layer {key[0]} {key[1]}"
        dur = self.steps["confounds"].evidence.get("duration_balanced_accuracy")
        note = (f"; note that duration alone scores {dur:.2f} (see confounds)"
                if self.confound_sig.get("duration") and dur is not None else "")
        detail = (f"best config ({cfg}) scores {obs:.2f} (logreg {self.best_score:.2f}); with labels shuffled "
                  f"({self.shuffle_kind} shuffle, {self.n_perm}x) {null_best.mean():.2f} +- {null_best.std():.2f}, "
                  f"best of all configs {null_max.mean():.2f}; p = {p_sel:.3f} (selection-aware){note}")
        if p_sel > ALPHA:
            self.add("label-shuffle control", FAIL, ev, f"no better than shuffled labels: {detail}",
                     "the features carry no detectable label signal: check label alignment, pooling scope and "
                     "layers before tuning probes")
        else:
            folds_failed = self.steps.get("fold sanity") and self.steps["fold sanity"].status == FAIL
            if folds_failed:
                self.add("label-shuffle control", WARN, ev, f"above shuffled labels, but on leaky folds: {detail}",
                         "fix the fold problem; this score is inflated until then", caused_by="fold sanity")
            else:
                self.add("label-shuffle control", PASS, ev, detail)

    # -- 6 padding and pooling -----------------------------------------------------------------
    def padding(self, store: Store) -> None:
        attrs = store.attrs
        y, k, folds = self.y, self.k, self.folds
        layer = self.best_key[0]
        p = self.pooled[layer]
        ev: dict[str, Any] = {"layer": layer}
        fails, warns, advice = [], [], []
        # (a) frames the audio cannot explain
        stride = float(attrs.get("frame_stride_samples") or 0)
        rf = float(attrs.get("receptive_field_samples") or 0)
        sr = float(attrs.get("sample_rate") or 0)
        T, ns = self.num_frames.astype(np.float64), self.num_samples
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
                fails.append(f"{_pct(flagged.mean())} of the items have more frames than their audio allows "
                             f"(~{_pct(ev['padding_frame_share'])} of their frames are padding)")
        if len(np.unique(T)) == 1 and len(np.unique(ns)) > 1 and len(T) >= 10:
            padded_frames = True
            fails.append(f"every item has exactly {int(T[0])} frames although clip lengths differ")
        same_len = len(np.unique(ns)) == 1 and len(ns) >= 10
        ev["all_clips_same_length"] = bool(same_len)
        # (b) first or last frames identical across items (padding at one end)
        ratios, ends = [], []
        for q in self.pooled.values():
            sf, sl = q.clip_first.std(axis=0).mean(), q.clip_last.std(axis=0).mean()
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
        # (c) the padding audit recorded at extraction
        audit = attrs.get("padding_audit") or {}
        exact = bool(attrs.get("padding_exact", False))
        ev["padding_exact"] = exact
        if isinstance(audit, dict) and audit.get("max_abs"):
            mx = np.asarray(audit.get("max_abs"), dtype=np.float64)
            mn = np.asarray(audit.get("mean_abs", []), dtype=np.float64)
            ev["audit_max_abs"] = float(mx.max())
            ev["audit_mean_abs"] = float(mn.max()) if mn.size else float("nan")
            ev["audit_pad_seconds"] = audit.get("pad_seconds")
            worst = int(mx.argmax())
            audit_msg = (f"padding inside the model would change frames by up to {mx.max():.2f} "
                         f"(layer {worst})")
            if mx.max() > 0.05 and not exact:
                warns.append(audit_msg + " and this store was not extracted padding-exact")
                advice.append("re-extract padding-exact")
        else:
            audit_msg = "no padding audit recorded"
        # (d) stale cache
        bad_cache = {key: v for key, v in self.cache_diff.items() if not v <= 1e-3}
        ev["pooled_cache_checked"] = len(self.cache_diff)
        ev["pooled_cache_mismatch"] = len(bad_cache)
        if bad_cache:
            first = next(iter(bad_cache))
            fails.append(f"the pooled/ cache disagrees with the frames ({len(bad_cache)} arrays, e.g. pooled/{first})")
            advice.append("delete the store's pooled/ group (h5py: del f['pooled']) so sweeps re-pool from the frames")
        # (e) ablation with logistic regression
        if stride > 0 and sr > 0:
            pad_len = max(int(np.floor((PAD_SECONDS * sr - rf) / stride)) + 1, int(T.max()))
        else:
            pad_len = int(T.max())
        ev["pad_frames"] = pad_len
        variants = {"true": p.clip_mean, "padded": p.clip_mean * (np.minimum(T, pad_len) / pad_len)[:, None]}
        if self.scope == "segment":
            variants["segment"] = p.mean
        scores, shares = {}, {}
        self.ablation_pred = {}
        for name, X in variants.items():
            pred = _logreg_oof(X, y, folds, k, None, self.seed)
            self.ablation_pred[name] = pred
            scores[name] = _oof_bacc(y, pred, k)
            share, cls, collapsed = _collapse(y, pred, k)
            shares[name] = share
            if collapsed:
                (fails if name != "padded" else warns).append(
                    f"{name} pooling collapses: it predicts {self.classes[cls]!r} for {_pct(share)} of the items")
        ev["balanced_accuracy"] = scores
        ev["largest_predicted_share"] = shares
        ev["padding_share_simulated"] = float(1 - np.minimum(T, pad_len).sum() / (pad_len * len(T)))
        delta = scores["padded"] - scores["true"]
        dur = self.confound_sig.get("duration")
        ev["padded_minus_true"] = delta
        padded_wins, ev_note = False, ""
        if delta >= 0.05 and dur:
            padded_wins = True
            warns.append(f"padded pooling scores {delta:+.2f} higher only because it encodes clip duration, which "
                         "alone predicts the label (see confounds): a confound, not a win")
            advice.append("keep true-frame pooling and report the duration-only score beside it")
        elif delta >= 0.05:
            ev_note = (f"; padded pooling scores {delta:+.2f} higher although duration alone does not predict the "
                       "label: padding turns the mean into a sum, so a short cue is no longer diluted by long clips")
            advice.append("the cue looks short: pool over segments or use stats/max pooling rather than padding")
        seg_msg = ""
        if "segment" in scores:
            seg_msg = f", segment {scores['segment']:.2f}"
            if scores["segment"] - scores["true"] >= 0.05:
                advice.append("pool over segments (--scope segment)")
        summary = (f"layer {layer} mean pooling: true frames {scores['true']:.2f}, padded to {pad_len} frames "
                   f"{scores['padded']:.2f}{seg_msg}; {audit_msg}{ev_note}")
        cause = "confounds" if padded_wins and dur == FAIL and not fails else None
        if fails:
            self.add("padding and pooling", FAIL, ev, "; ".join(fails) + f" ({summary})",
                     "; ".join(dict.fromkeys(advice)) or "check how the frames were extracted")
        elif warns:
            self.add("padding and pooling", WARN, ev, "; ".join(warns) + f" ({summary})",
                     "; ".join(dict.fromkeys(advice)), caused_by=cause)
        else:
            self.add("padding and pooling", PASS, ev, summary, "; ".join(dict.fromkeys(advice)))

    # -- 7 layer profile -----------------------------------------------------------------------
    def layer_profile(self) -> None:
        ev: dict[str, Any] = {"chance": self.chance}
        best_per = {}
        ranges = {}
        for pooling in ("mean", "stats"):
            sc = {layer: self.screen_scores[(layer, pooling)] for layer in self.layers}
            bl = max(sc, key=lambda l: (round(sc[l], 6), -l))
            best_per[pooling] = {"layer": bl, "balanced_accuracy": sc[bl]}
            ranges[pooling] = max(sc.values()) - min(sc.values())
        ev["best_per_pooling"] = best_per
        ev["range_over_layers"] = ranges
        ev["screen"] = {f"{l}/{p}": s for (l, p), s in self.screen_scores.items()}
        null_all = np.concatenate(list(self.screen_null.values()))
        null_hi = float(np.percentile(null_all, 95)) if null_all.size else float("nan")
        ev["shuffled_95th_percentile"] = null_hi
        self.report._profile = {"scores": dict(self.screen_scores), "null_hi": null_hi, "chance": self.chance,
                                "layers": list(self.layers), "best": self.best_key, "best_logreg": self.best_score}
        flat = len(self.layers) > 2 and max(ranges.values()) < 0.03
        parts = [f"best layer {v['layer']} for {p} ({v['balanced_accuracy']:.2f})" for p, v in best_per.items()]
        msg = "; ".join(parts) + (f"; the curve is flat (range {max(ranges.values()):.2f})" if flat else
                                  f"; range over layers {max(ranges.values()):.2f}")
        status, advice = PASS, f"sweep around layer {self.best_key[0]} first"
        if flat:
            status, advice = WARN, "a flat profile: the cue is either everywhere or nowhere; check the shuffle control"
        if self.steps["label-shuffle control"].status == FAIL:
            status = WARN
            advice = "no layer beats shuffled labels: the profile is noise until the shuffle control passes"
        if self.baseline_path is not None:
            b_status, b_msg, b_ev = self._baseline()
            ev.update(b_ev)
            msg += "; " + b_msg
            if b_status == WARN:
                status = WARN
                advice = "the model adds nothing over the acoustic baseline here: check padding, layers and scope"
        self.add("layer profile", status, ev, msg, advice)

    def _baseline(self) -> tuple[str, str, dict]:
        try:
            bstore = open_store(self.baseline_path)
        except (OSError, ValueError) as exc:
            raise DoctorError(f"baseline: {exc}") from None
        with bstore:
            items = bstore.items
            name = str(bstore.attrs.get("encoder", "") or Path(self.baseline_path).stem)
            status = items["status"].astype(str).to_numpy()
            ok = (status == OK) & (items["num_frames"].to_numpy() > 0)
            bid = items["id"].astype(str).to_numpy()
            pos = {i: r for r, i in enumerate(bid) if ok[r]}
            common = np.array([j for j, i in enumerate(self.ids) if i in pos], dtype=np.int64)
            if len(common) < max(10, len(self.ids) // 2):
                raise DoctorError(f"the baseline store {self.baseline_path} shares only {len(common)} of "
                                  f"{len(self.ids)} item ids with the store; give a baseline extracted from "
                                  "the same manifest")
            brows = np.array([pos[i] for i in self.ids[common]], dtype=np.int64)
            blabels = items["label"].astype(str).to_numpy()[brows]
            differ = int((blabels != self.labels_str[common]).sum())
            from probes.pooling import item_spans, resolve_scope

            clip = item_spans(bstore, "clip")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    auto = item_spans(bstore, resolve_scope(bstore, self.scope))
            except ValueError:
                auto = clip
            y = self.y[common]
            if len(common) == len(self.ids):
                folds = self.folds
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    folds = make_folds(self.labels_str[common], self.groups[common], self.cv, self.seed)
            bscores, bpooled = {}, {}
            for layer in bstore.layer_ids:
                q = _pool_layer(bstore, layer, brows, auto, clip)
                for pooling in ("mean", "stats"):
                    X = q.get(pooling)
                    if not np.isfinite(X).all():
                        continue
                    bpooled[(layer, pooling)] = X
                    pred = lda_cv_predict(screen_features(X, seed=self.seed), y[None, :], folds, self.k)[0]
                    bscores[(layer, pooling)] = _oof_bacc(y, pred, self.k)
        if not bscores:
            return WARN, f"baseline {name}: no finite features", {}
        bkey = max(bscores, key=lambda c: (round(bscores[c], 6), -c[0]))
        b_pred = _logreg_oof(bpooled[bkey], y, folds, self.k, None, self.seed)
        m_X = self.pooled[self.best_key[0]].get(self.best_key[1])[common]
        m_pred = self.best_pred[common] if folds is self.folds else _logreg_oof(m_X, y, folds, self.k, None, self.seed)
        m, b = _oof_bacc(y, m_pred, self.k), _oof_bacc(y, b_pred, self.k)
        lo, hi = _speaker_bootstrap_diff(y, m_pred, b_pred, self.groups[common], self.k, seed=self.seed)
        ev = {"baseline_balanced_accuracy": b, "baseline_layer": bkey[0], "model_balanced_accuracy": m,
              "model_minus_baseline": m - b, "difference_ci_low": lo, "difference_ci_high": hi,
              "baseline_items": len(common), "baseline_label_mismatches": differ}
        self.report._profile["baseline"] = {"name": name, "score": b, "scores": bscores}
        pts = 100 * (m - b)
        if lo > 0:
            return PASS, (f"the model beats {name} by {pts:.1f} points ({m:.2f} vs {b:.2f}, 95 % CI "
                          f"{100 * lo:.1f} to {100 * hi:.1f})"), ev
        if hi < 0:
            return WARN, f"the model does not beat {name}: {name} is {-pts:.1f} points better ({b:.2f} vs {m:.2f})", ev
        return WARN, (f"the model does not clearly beat {name} ({m:.2f} vs {b:.2f}, difference {pts:+.1f} points, "
                      f"95 % CI {100 * lo:.1f} to {100 * hi:.1f})"), ev

    # -- 8 class imbalance ---------------------------------------------------------------------
    def imbalance(self) -> None:
        y, k = self.y, self.k
        layer, pooling = self.best_key
        X = self.pooled[layer].get(pooling)
        pred_b = _logreg_oof(X, y, self.folds, k, "balanced", self.seed)
        res = {"none": (self.best_pred, self.best_score), "balanced": (pred_b, _oof_bacc(y, pred_b, k))}
        counts = np.bincount(y, minlength=k)
        ev: dict[str, Any] = {"imbalance_ratio": float(counts.max() / max(1, counts.min())),
                              "balanced_accuracy": {w: s for w, (_, s) in res.items()},
                              "recall": {w: _recalls(y, p, self.classes) for w, (p, _) in res.items()}}
        better = max(res, key=lambda w: (round(res[w][1], 6), w == "none"))
        rec = ev["recall"]
        min_none = min(rec["none"].values())
        min_bal = min(rec["balanced"].values())
        worst = min(rec[better], key=rec[better].get)
        rec_msg = "; ".join(f"{w}: bacc {s:.2f}, recall " + ", ".join(f"{c} {v:.2f}" for c, v in rec[w].items())
                            for w, (_, s) in res.items())
        if rec[better][worst] < 0.1:
            self.add("class imbalance", FAIL, ev, f"class {worst!r} is almost never recognised ({rec_msg})",
                     "more data for that class, merge classes, or fix the upstream steps first")
        elif min_none < 0.3 and min_bal - min_none >= 0.15:
            self.add("class imbalance", WARN, ev, f"without weighting the rarest classes are neglected ({rec_msg})",
                     "use --class-weight balanced (or sampling)")
        else:
            d = res["balanced"][1] - res["none"][1]
            self.add("class imbalance", PASS, ev,
                     f"balanced weighting changes balanced accuracy by {d:+.2f} ({rec_msg})",
                     "use --class-weight balanced" if d >= 0.02 else "")


def run_doctor(
    store_path: str | Path,
    baseline: str | Path | None = None,
    out_dir: str | Path | None = None,
    layers: Sequence[int] | None = None,
    n_permutations: int = 100,
    cv: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> DoctorReport:
    """Run the eight steps on a store and write ``doctor.md``, ``doctor.json`` and figures.

    ``baseline``: an acoustic store (e.g. log-Mel) of the same items for step 7; ``out_dir``
    default ``cache/doctor/<store stem>/``; ``layers`` None = every layer; ``n_permutations`` label
    shuffles for step 5 and the confound tests; ``cv`` speaker-grouped folds. Raises
    :class:`DoctorError` for user errors (missing file, bad option).
    """
    store_path = Path(store_path)
    if not store_path.exists():
        raise DoctorError(f"no store at {store_path}")
    if baseline is not None and not Path(baseline).exists():
        raise DoctorError(f"no baseline store at {baseline}")
    if cv < 2:
        raise DoctorError(f"cv must be at least 2, got {cv}")
    if n_permutations < 0:
        raise DoctorError(f"n_permutations must be 0 or more, got {n_permutations}")
    if layers is not None and not len(layers):
        raise DoctorError("layers is empty")
    from threadpoolctl import threadpool_limits

    log = _logger(progress)
    with threadpool_limits(limits=1):  # many small fits: one BLAS thread is faster and never oversubscribes
        report = _Doctor(store_path, None if baseline is None else Path(baseline), layers, n_permutations, cv,
                         seed, log).run()
    out = Path(out_dir) if out_dir is not None else Path("cache") / "doctor" / store_path.stem
    write_report(report, out)
    return report


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(f"[dim]doctor: {msg}[/]", highlight=False)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
STATUS_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def summary_table(report: DoctorReport):
    """A rich Table: step, status, evidence (the message), advice."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"probes doctor: {Path(report.store).name}", show_lines=True, expand=False)
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("status")
    table.add_column("evidence", overflow="fold", ratio=3)
    table.add_column("advice", overflow="fold", ratio=2)
    for i, s in enumerate(report, 1):
        style = STATUS_STYLE.get(s.status, "")
        status = f"[{style}]{s.status.upper()}[/]" + (f"\n[dim](after {escape(s.caused_by)})[/]" if s.caused_by else "")
        table.add_row(str(i), s.name, status, escape(s.message), escape(s.advice))
    return table


def _plot_profile(report: DoctorReport, path: Path) -> Path | None:
    prof = report._profile
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
    ax.set_title(f"layer profile: {Path(report.store).stem}")
    if len(layers) > 1:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: DoctorReport, out_dir: str | Path) -> Path:
    """Write ``doctor.md``, ``doctor.json`` and the figures into ``out_dir``; return the md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.out_dir = out
    p = _plot_profile(report, out / "layer_profile.png")
    if p is not None:
        report.figures["layer_profile"] = p
    lines = [f"# probes doctor: `{Path(report.store).name}`", "",
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
             f"{'**FAILED** ' + ', '.join(s.name for s in report.failed) if report.failed else 'no step failed'}; "
             f"{report.seconds:.1f} s.", ""]
    if report.best:
        b = report.best
        lines += [f"Best configuration: layer {b['layer']}, {b['pooling']} pooling ({b['scope']}), logreg balanced "
                  f"accuracy {b['balanced_accuracy']:.3f} (chance {b['chance']:.3f}).", ""]
    lines += ["| # | step | status | evidence | advice |", "|---|---|---|---|---|"]
    for i, s in enumerate(report, 1):
        status = f"**{s.status}**" + (f" (after {s.caused_by})" if s.caused_by else "")
        cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {i} | {s.name} | {status} | {cell(s.message)} | {cell(s.advice)} |")
    lines.append("")
    for name, p in report.figures.items():
        lines += [f"![{name}]({p.name})", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += ["## Evidence", ""]
    for i, s in enumerate(report, 1):
        lines += [f"### {i}. {s.name}: {s.status}", "", "```json", json.dumps(s.evidence, indent=1), "```", ""]
    md = out / "doctor.md"
    md.write_text("\n".join(lines))
    (out / "doctor.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return md

"""The probe sweep: (store, layer, scope, pooling, probe, class weighting, fold) cells in parallel.

A *configuration* is (store, layer, scope, pooling, probe, class weighting); a *cell* is a
configuration fit on one training part and scored on its test part. Pooled-input probes
(``logreg``, ``xgb``) take every pooling; the attentive MLP (``attn-mlp``) reads the frames and
pools by itself (pooling column ``attention``); ``weighted-layers`` learns a weighted sum of all
swept layers' mean-pooled vectors (layer column ``all``, pooling ``mean``). Both ignore
``poolings``.

How a sweep runs (:func:`run_sweep`):

1. per store, the usable items are those with ``status == ok`` and a non-empty label (the others
   are skipped with a printed note); the outer folds (:func:`featstore.cv.make_folds`,
   speaker-grouped, seeded) are made once and shared by every configuration of that store; for
   the nested headline, each outer fold's training part is split again
   (:func:`featstore.cv.nested_folds`);
2. per layer, the parent process pools the features (:mod:`probes.pooling`, cached beside the
   store) and ships only arrays to the workers (joblib ``Parallel(n_jobs, backend=backend)``;
   ``backend=None`` uses whatever ``joblib.parallel_config`` is active, e.g. ``"dask"``);
3. each finished cell is saved as ``out_dir/cells/<key>.json``; ``key`` hashes the store's content
   identity, the configuration, the probe's full parameters (defaults included), the seed, the
   z-scoring flag, the cell's train/test items and the package and library versions
   (:func:`probes.cache.library_versions`); a re-run loads finished cells instead of fitting them,
   and an upgrade or a changed default refits;
4. out-of-fold predictions are scored (:mod:`probes.metrics`) beside the ``majority`` and
   ``chance`` baselines of the same folds, and written to ``folds.csv``, ``summary.csv``,
   ``predictions.csv``, ``inner_folds.csv`` and ``best.json``; the headline is chosen by
   :mod:`probes.selection` (true nested CV where affordable, see :func:`nested_plan`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from featstore.cv import describe_folds, fill_groups, fit_groups, fold_ids, make_folds, nested_folds
from featstore.layerspec import LayerSpecError, select_layers
from featstore.layerspec import parse_layers as parse_layer_spec
from featstore.store import OK, Store, missing_store_message, open_store
from probes import metrics as M
from probes import selection as S
from probes import tables
from probes.bootstrap import bootstrap_ci, bootstrap_confusions
from probes.names import (BASELINES, CLASS_WEIGHTS, DEFAULT_CLASS_WEIGHTS, DEFAULT_POOLINGS, DEFAULT_PROBES,
                          ID_COLUMNS, NESTED_MODES, POOLINGS, PROBES, SCOPES, SELF_POOLING, check_names,
                          probe_input_kind, store_tags)
from probes.provenance import labels as provenance_labels
from probes.provenance import store_provenance

__all__ = ["run_sweep", "Sweep", "SweepConfig", "SweepResult", "SweepError", "Config", "parse_layers",
           "fit_cell", "nested_plan", "store_identity", "zscore_by_group", "PROBES", "CLASS_WEIGHTS",
           "BASELINES", "DEFAULT_POOLINGS", "DEFAULT_PROBES", "DEFAULT_CLASS_WEIGHTS", "SELF_POOLING", "ID_COLUMNS"]

#: bump when the meaning of a cached cell changes
CELL_VERSION = 2
N_CHANCE_DRAWS = 10
#: inner folds of the nested headline
INNER_CV = 3
#: affordable nested selection, in logistic-regression fits: ``--nested auto`` runs the inner
#: folds of every configuration when (configurations x outer folds x inner folds), weighted by
#: :data:`FIT_COST`, stays below this; otherwise only those of the logreg configurations
NESTED_BUDGET = 3000
#: rough cost of one fit relative to logreg (measured on the default benchmark store)
FIT_COST = {"logreg": 1, "xgb": 25, "attn-mlp": 20, "weighted-layers": 20}
#: probe parameters that change speed but not results (left out of cell keys)
_RUNTIME_PARAMS = ("n_jobs", "n_threads")


class SweepError(ValueError):
    """A sweep cannot run with these inputs (a user error: bad file, option or data)."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """Everything that defines a sweep (see :func:`run_sweep` for the meaning of each field)."""

    stores: list[Path]
    layers: Any = None
    scope: str = "auto"
    poolings: tuple[str, ...] = DEFAULT_POOLINGS
    probes: tuple[str, ...] = DEFAULT_PROBES
    class_weights: tuple[str, ...] = DEFAULT_CLASS_WEIGHTS
    cv: int = 5
    n_jobs: int = 1
    out_dir: Path | None = None
    seed: int = 0
    label_map: dict[str, str] | None = None
    speaker_zscore: bool = False
    backend: str | None = "loky"
    progress: bool = True
    quiet: bool = False
    n_boot: int = 1000
    top: int = 10
    probe_params: dict[str, dict] | None = None
    nested: str = "auto"
    inner_cv: int = INNER_CV
    scheduler: str | None = None

    def __post_init__(self) -> None:
        self.stores = [Path(p) for p in self.stores]
        if not self.stores:
            raise SweepError("no store given")
        for p in self.stores:
            if not p.exists():
                raise SweepError(missing_store_message(p))
        names = [p.stem for p in self.stores]
        if len(set(names)) != len(names):
            raise SweepError(f"two stores share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; rename one")
        try:
            self.layer_spec = parse_layer_spec(self.layers)
            self.poolings = check_names(self.poolings, POOLINGS, "pooling")
            self.probes = check_names(self.probes, PROBES, "probe")
            self.class_weights = check_names(
                ["none" if c in (None, "None") else c for c in self.class_weights], CLASS_WEIGHTS, "class weight")
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        self.layers = None if self.layer_spec.every else [*self.layer_spec.layers, *self.layer_spec.from_end]
        if self.scope not in SCOPES:
            raise SweepError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.cv < 2:
            raise SweepError(f"cv must be at least 2, got {self.cv}")
        if self.inner_cv < 2:
            raise SweepError(f"inner_cv must be at least 2, got {self.inner_cv}")
        nested = str(self.nested).strip()
        if nested not in NESTED_MODES:
            try:
                nested = ",".join(check_names(nested.split(","), PROBES, "probe for --nested"))
            except ValueError as exc:
                raise SweepError(f"{exc} (or one of {', '.join(NESTED_MODES)})") from None
        self.nested = nested
        try:
            self.label_map = M.parse_label_map(self.label_map) if not isinstance(self.label_map, dict) else self.label_map
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        self.probe_params = {k: dict(v) for k, v in (self.probe_params or {}).items()}
        for k in self.probe_params:
            if k not in PROBES:
                raise SweepError(f"probe_params names unknown probe {k!r}; use one of {', '.join(PROBES)}")
        if self.out_dir is None:
            self.out_dir = Path("cache") / "sweeps" / "+".join(names)
        self.out_dir = Path(self.out_dir)


def parse_layers(spec: str | int | Sequence | None) -> list[int] | None:
    """``"0-12"``, ``"0-3,6"``, ``"all"`` -> sorted layer indices, or None for every layer.

    The one parser is :func:`featstore.layerspec.parse_layers`; this entry point returns a plain
    list (without a store, a layer counted from the end, ``-1``, cannot be listed: pass the spec
    text to :func:`run_sweep` instead).
    """
    try:
        parsed = parse_layer_spec(spec)
    except LayerSpecError as exc:
        raise SweepError(str(exc)) from None
    if parsed.every:
        return None
    if parsed.from_end:
        raise SweepError(f"layer {parsed.from_end[0]} counts from the end: pass the spec to the sweep, "
                         "which resolves it against each store's layers")
    return list(parsed.layers)


@dataclass(frozen=True)
class Config:
    """One probe configuration (a row of ``summary.csv``)."""

    store: str
    encoder: str
    layer: str
    scope: str
    pooling: str
    probe: str
    class_weight: str

    @property
    def key(self) -> str:
        return "|".join([self.store, f"L{self.layer}", self.scope, self.pooling, self.probe, self.class_weight])


@dataclass
class SweepResult:
    """Tables of a finished sweep (also written to ``out_dir``)."""

    folds: pd.DataFrame
    summary: pd.DataFrame
    predictions: pd.DataFrame
    best: dict
    out_dir: Path
    n_cells: int
    n_fitted: int
    n_cached: int
    notes: list[str] = field(default_factory=list)
    #: wall seconds of the phases: prepare (folds, identities), features (pooling in the parent),
    #: fit (cells in the workers, including waiting), tables (scoring, bootstrap), write
    timings: dict[str, float] = field(default_factory=dict)
    #: inner-fold scores of the nested selection (config, fold, inner_fold, balanced_accuracy, ...)
    inner: pd.DataFrame = field(default_factory=pd.DataFrame)


# ---------------------------------------------------------------------------------------------
# Per-store data
# ---------------------------------------------------------------------------------------------
def store_identity(store: Store) -> str:
    """The store's content identity (:meth:`featstore.store.Store.identity`)."""
    return store.identity()


def store_layers(store: Store) -> list[int]:
    """Layer indices held by a store (``layers/NN`` names)."""
    return list(store.layer_ids)


@dataclass
class StoreData:
    path: Path
    name: str
    encoder: str
    identity: str
    scope: str
    rows: np.ndarray          # store rows used, in store order
    ids: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    classes: list[str]
    y: np.ndarray             # int codes into classes
    folds: list[tuple[np.ndarray, np.ndarray]]
    layers: list[int]
    layer_dims: dict[int, int]
    fold_info: pd.DataFrame
    fit_groups: np.ndarray | None = None
    inner: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    tags: tuple[str, ...] = ()  # what sets it apart from a trained, padding-exact store (names.store_tags)

    def fold_signature(self) -> tuple:
        """The item ids of every outer test fold and inner fold: equal signatures = identical folds."""
        outer = tuple(tuple(self.ids[te]) for _, te in self.folds)
        inner = tuple(tuple(tuple(self.ids[te]) for _, te in part) for part in self.inner)
        return outer, inner


def _prepare_store(path: Path, cfg: SweepConfig, notes: list[str]) -> StoreData:
    from probes.pooling import resolve_scope

    try:
        store = open_store(path)
    except (OSError, ValueError) as exc:
        raise SweepError(str(exc)) from None
    with store:
        name = path.stem
        status = store.column("status")
        labels = np.array(["" if v is None else str(v).strip() for v in store.column("label")], dtype=object)
        nfr = store.column("num_frames")
        ok = (status == OK) & (nfr > 0)
        labelled = labels != ""
        use = ok & labelled
        n_bad, n_unl = int((~ok).sum()), int((ok & ~labelled).sum())
        msg = f"{name}: using {int(use.sum())} of {len(use)} items"
        skipped = [f"{n_unl} unlabelled"] * bool(n_unl) + [f"{n_bad} with status != ok"] * bool(n_bad)
        notes.append(msg + (f" (skipped {', '.join(skipped)})" if skipped else ""))
        rows = np.flatnonzero(use)
        if not len(rows):
            raise SweepError(f"{path}: no labelled items with status ok")
        try:
            scope = resolve_scope(store, cfg.scope)
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        if scope == "segment":
            seg = store.column("segment_start_frame")[rows]
            if (seg < 0).all():
                raise SweepError(f"{path} has no segments; use --scope clip or auto")
            if (seg < 0).any():
                raise SweepError(f"{path}: {int((seg < 0).sum())} of {len(rows)} items have no segment; "
                                 "use --scope clip, or give every item a segment")
        have = store_layers(store)
        layers, missing = select_layers(cfg.layer_spec, have)
        if not layers:
            raise SweepError(f"{path} has none of the layers {_fmt_layers(cfg.layers)} (it has {_fmt_layers(have)})")
        if missing:
            notes.append(f"{name}: has no layer {_fmt_layers(missing)}; swept {_fmt_layers(layers)}")
        dims = {k: store.layer_dim(k) for k in layers}
        groups = np.array(["" if v is None else str(v) for v in store.column("group")[rows]], dtype=object)
        lab = labels[rows]
        classes, y = np.unique(lab.astype(str), return_inverse=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                folds = make_folds(lab, groups, cfg.cv, cfg.seed)
            except ValueError as exc:
                raise SweepError(f"{path}: {exc}") from None
        for w in caught:
            notes.append(f"{name}: {w.message}")
            warnings.warn(str(w.message), w.category, stacklevel=3)
        if cfg.label_map:
            try:
                M.binary_split(cfg.label_map, classes)
            except ValueError as exc:
                raise SweepError(f"{path}: {exc}") from None
        inner = nested_folds(folds, lab, groups, cfg.inner_cv, cfg.seed) if cfg.nested != "off" else []
        filled = fill_groups(groups)
        ungrouped = [f for f, part in enumerate(inner)
                     if (groups != "").any() and any(set(filled[a]) & set(filled[b]) for a, b in part)]
        if ungrouped:
            notes.append(f"{name}: the inner folds of outer fold(s) {_fmt_layers(ungrouped)} are stratified by item, "
                         "not grouped by speaker (too few speakers per class in the outer training part), so "
                         "their selection can reward remembering speakers; the outer score is still held out")
        return StoreData(
            path=path, name=name, encoder=str(store.attrs.get("encoder", "")), identity=store.identity(),
            scope=scope, rows=rows, ids=store.column("id")[rows], labels=lab, groups=groups,
            classes=[str(c) for c in classes], y=y.astype(np.int64), folds=folds, layers=layers,
            layer_dims=dims, fold_info=describe_folds(folds, lab, groups).assign(store=name),
            fit_groups=fit_groups(groups), inner=inner, tags=tuple(store_tags(store.attrs)),
        )


def _fmt_layers(layers: Sequence[int] | None) -> str:
    return "all" if layers is None else ",".join(map(str, layers))


def _configs(sd: StoreData, cfg: SweepConfig, notes: list[str] | None = None) -> list[tuple[Config, Any]]:
    """``(Config, layer spec)`` pairs of one store in a fixed order; layer spec = int or list."""
    out = []
    kinds = {p: probe_input_kind(p) for p in cfg.probes}
    for layer in sd.layers:
        for probe in cfg.probes:
            if kinds[probe] == "pooled":
                for pooling in cfg.poolings:
                    for cw in cfg.class_weights:
                        out.append((Config(sd.name, sd.encoder, str(layer), sd.scope, pooling, probe, cw), layer))
            elif kinds[probe] == "frames":
                for cw in cfg.class_weights:
                    out.append((Config(sd.name, sd.encoder, str(layer), sd.scope, SELF_POOLING["frames"], probe, cw), layer))
    for probe in cfg.probes:
        if kinds[probe] == "layers":
            if len(set(sd.layer_dims.values())) > 1:
                if notes is not None:
                    notes.append(f"{sd.name}: {probe} skipped: its layers differ in width "
                                 f"({sorted(set(sd.layer_dims.values()))})")
                continue
            for cw in cfg.class_weights:
                out.append((Config(sd.name, sd.encoder, "all", sd.scope, SELF_POOLING["layers"], probe, cw), list(sd.layers)))
    return out


def _probe_params_json(probe: str, class_weight: str, seed: int, params_json: str) -> str:
    """Every parameter of the probe as built for a cell, defaults included (minus thread counts)."""
    from probes.estimators import make_probe

    cw = None if class_weight == "none" else class_weight
    est = make_probe(probe, class_weight=cw, random_state=seed, **json.loads(params_json))
    params = {k: v for k, v in est.get_params(deep=False).items() if k not in _RUNTIME_PARAMS}
    return json.dumps(tables.jsonable(params), sort_keys=True)


def cell_key(sd: StoreData, conf: Config, train: np.ndarray, test: np.ndarray, cfg: SweepConfig) -> str:
    """Cache key of one cell: store identity, configuration, full probe parameters, seed, z-scoring,
    classes, the cell's train and test items, and the package/library versions."""
    from probes.cache import library_versions

    params = cfg.probe_params.get(conf.probe, {})
    payload = {
        "v": CELL_VERSION, "store": sd.identity, "layer": conf.layer, "scope": conf.scope,
        "pooling": conf.pooling, "probe": conf.probe, "class_weight": conf.class_weight,
        "seed": cfg.seed, "zscore": bool(cfg.speaker_zscore), "classes": sd.classes,
        "layers": sd.layers if conf.layer == "all" else None, "params": params,
        "estimator": _probe_params_json(conf.probe, conf.class_weight, cfg.seed, json.dumps(params, sort_keys=True)),
        "versions": library_versions(),
    }
    h = hashlib.sha256()
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(sd.rows[train], dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(sd.rows[test], dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


@dataclass
class Cell:
    """One fit: a configuration on one training part, scored on its test part."""

    sd: StoreData
    conf: Config
    spec: Any
    fold: int                 # outer fold
    inner: int | None         # inner fold (nested selection) or None for the outer cell
    train: np.ndarray
    test: np.ndarray
    key: str = ""


# ---------------------------------------------------------------------------------------------
# The nested plan
# ---------------------------------------------------------------------------------------------
@dataclass
class NestedPlan:
    """Which configurations the true nested selection covers, and why."""

    mode: str
    configs: set[str]                 # config keys with inner cells
    scope: str                        # "" (every configuration) or which ones and why
    reason: str
    n_configs: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.configs)


def nested_plan(cfg: SweepConfig, datas: list[StoreData], configs: list[tuple[StoreData, Config]]) -> NestedPlan:
    """Choose the configurations whose inner folds are fitted (the headline's candidates).

    ``nested="off"``: none. ``"all"``: every configuration. A list of probes (``"logreg,xgb"``):
    those probes' configurations. ``"auto"``: every configuration when its cost (inner fits weighted
    by :data:`FIT_COST`) is at most :data:`NESTED_BUDGET` logreg fits, else the logreg
    configurations (none when the sweep has no logreg: the headline is then chosen on the other
    outer folds and says so).
    """
    if cfg.nested == "off":
        return NestedPlan("off", set(), "", "nested selection turned off (--nested off)")
    lacking = [sd.name for sd in datas if not sd.inner or any(not part for part in sd.inner)]
    if lacking:
        return NestedPlan(cfg.nested, set(), "", f"{', '.join(lacking)}: an outer training part is too small "
                          "for inner folds (too few speakers or items per class)")
    n_outer_inner = {sd.name: sum(len(part) for part in sd.inner) for sd in datas}
    if cfg.nested == "all":
        chosen = [c for _, c in configs]
        scope = ""
    elif cfg.nested == "auto":
        cost = sum(FIT_COST[c.probe] * n_outer_inner[c.store] for _, c in configs)
        if cost <= NESTED_BUDGET:
            chosen, scope = [c for _, c in configs], ""
        else:
            chosen = [c for _, c in configs if c.probe == "logreg"]
            scope = (f"the logreg ones of {len(configs)}: inner fits of every probe would cost ~{cost} logreg "
                     f"fits, over the budget of {NESTED_BUDGET}; --nested all fits them")
            if not chosen:
                return NestedPlan("auto", set(), "", f"a nested fit of this grid would cost ~{cost} logreg fits "
                                  f"(budget {NESTED_BUDGET}) and it has no logreg configuration; use --nested all")
    else:
        allowed = set(cfg.nested.split(","))
        chosen = [c for _, c in configs if c.probe in allowed]
        scope = f"the {cfg.nested} ones of {len(configs)}, --nested {cfg.nested}"
        if not chosen:
            return NestedPlan(cfg.nested, set(), "", f"no configuration of probe {cfg.nested} in this sweep")
    return NestedPlan(cfg.nested, {c.key for c in chosen}, scope, "", len(chosen))


# ---------------------------------------------------------------------------------------------
# Features (parent process)
# ---------------------------------------------------------------------------------------------
def zscore_by_group(x: np.ndarray, groups: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Standardise rows (axis 0) with their own group's mean and std (std < eps -> 1).

    Label-free but transductive when groups include test speakers. A speaker with one item gets
    zero vectors (only centring applies).
    """
    out = np.empty_like(x, dtype=np.float32)
    _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    for k in range(g.max() + 1 if len(g) else 0):
        sel = g == k
        mu = x[sel].mean(axis=0, dtype=np.float64)
        sd = x[sel].std(axis=0, dtype=np.float64)
        out[sel] = (x[sel] - mu) / np.where(sd < eps, 1.0, sd)
    return out


class FrameBatch:
    """Frame sequences packed into one float32 array (cheap to ship to workers); ``seqs()`` gives views."""

    def __init__(self, data: np.ndarray, lengths: np.ndarray):
        self.data = np.asarray(data, dtype=np.float32)
        self.lengths = np.asarray(lengths, dtype=np.int64)

    @classmethod
    def from_seqs(cls, seqs: list[np.ndarray]) -> "FrameBatch":
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        data = np.concatenate(seqs).astype(np.float32) if seqs else np.zeros((0, 0), np.float32)
        return cls(data, lengths)

    def seqs(self, idx: np.ndarray) -> list[np.ndarray]:
        bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        return [self.data[bounds[i]: bounds[i + 1]] for i in idx]

    def zscore_by_group(self, groups: np.ndarray, eps: float = 1e-8) -> "FrameBatch":
        """Each speaker's frames standardised with that speaker's frame mean and std (float64)."""
        _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        frame_group = np.repeat(g, self.lengths)
        out = np.empty_like(self.data)
        for k in range(g.max() + 1 if len(g) else 0):
            sel = frame_group == k
            cat = self.data[sel].astype(np.float64)
            mu, sd = cat.mean(axis=0), cat.std(axis=0)
            out[sel] = ((self.data[sel] - mu) / np.where(sd < eps, 1.0, sd)).astype(np.float32)
        return FrameBatch(out, self.lengths)


def _features(store: Store, sd: StoreData, conf: Config, layer_spec: Any, cfg: SweepConfig) -> Any:
    from probes.pooling import all_layers_matrix, frame_batch, pooled_matrix

    kind = probe_input_kind(conf.probe)
    if kind == "pooled":
        x = pooled_matrix(store, layer_spec, conf.pooling, sd.scope, sd.rows, cache=True)
        return zscore_by_group(x, sd.groups) if cfg.speaker_zscore else x
    if kind == "layers":
        x = all_layers_matrix(store, conf.pooling, sd.scope, layer_spec, sd.rows)
        if cfg.speaker_zscore:
            x = np.stack([zscore_by_group(x[:, j], sd.groups) for j in range(x.shape[1])], axis=1)
        return x
    batch = FrameBatch(*frame_batch(store, layer_spec, sd.scope, sd.rows))
    return batch.zscore_by_group(sd.groups) if cfg.speaker_zscore else batch


# ---------------------------------------------------------------------------------------------
# One cell (worker process)
# ---------------------------------------------------------------------------------------------
def fit_cell(
    x: Any, y: np.ndarray, train: np.ndarray, test: np.ndarray, probe: str, class_weight: str,
    n_classes: int, seed: int = 0, n_threads: int = 1, groups: np.ndarray | None = None,
    params: dict | None = None,
) -> dict:
    """Fit one probe on ``train`` and predict ``test``: ``{"pred", "proba", "fit_seconds"}``.

    ``proba`` has one column per global class (zeros for classes absent from the training part).
    ``groups`` (speakers, see :func:`featstore.cv.fit_groups`) make the probe's own inner splits
    (early stopping, C search) grouped.
    """
    from probes.estimators import make_probe

    cw = None if class_weight == "none" else class_weight
    est = make_probe(probe, class_weight=cw, random_state=seed, n_threads=n_threads, **(params or {}))
    if isinstance(x, FrameBatch):
        x_tr, x_te = x.seqs(train), x.seqs(test)
    else:
        x_tr, x_te = x[train], x[test]
    groups = fit_groups(groups)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if groups is not None:
            est.fit(x_tr, y[train], groups=groups[train])
        else:
            est.fit(x_tr, y[train])
        fit_seconds, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
        local = np.asarray(est.predict_proba(x_te), dtype=np.float64)
        pred = np.asarray(est.predict(x_te)).astype(np.int64)
    proba = np.zeros((len(test), n_classes))
    proba[:, np.asarray(est.classes_, dtype=np.int64)] = local
    return {"pred": pred, "proba": proba, "fit_seconds": float(fit_seconds), "fit_cpu_seconds": float(fit_cpu)}


# ---------------------------------------------------------------------------------------------
# Cell cache
# ---------------------------------------------------------------------------------------------
def _load_cell(path: Path, n_test: int) -> dict | None:
    try:
        data = json.loads(path.read_text())
        out = {"pred": np.asarray(data["pred"], dtype=np.int64), "proba": np.asarray(data["proba"], dtype=np.float64),
               "fit_seconds": float(data["fit_seconds"]), "fit_cpu_seconds": float(data.get("fit_cpu_seconds", np.nan))}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out if len(out["pred"]) == n_test and out["proba"].shape[0] == n_test else None


def _save_cell(path: Path, res: dict, cell: Cell) -> None:
    data = {"config": asdict(cell.conf), "fold": cell.fold, "inner_fold": cell.inner,
            "fit_seconds": res["fit_seconds"], "fit_cpu_seconds": res["fit_cpu_seconds"],
            "pred": res["pred"].tolist(), "proba": res["proba"].tolist()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def run_sweep(
    stores: Sequence[str | os.PathLike],
    layers: Any = None,
    scope: str = "auto",
    poolings: Sequence[str] = DEFAULT_POOLINGS,
    probes: Sequence[str] = DEFAULT_PROBES,
    class_weights: Sequence[str] = DEFAULT_CLASS_WEIGHTS,
    cv: int = 5,
    n_jobs: int = 1,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    label_map: str | dict | None = None,
    speaker_zscore: bool = False,
    backend: str | None = "loky",
    progress: bool = True,
    quiet: bool = False,
    n_boot: int = 1000,
    probe_params: dict[str, dict] | None = None,
    nested: str = "auto",
    inner_cv: int = INNER_CV,
    scheduler: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep and write its tables to ``out_dir``.

    ``layers`` None/"all" = every layer of each store, or a spec (``"0-12"``, ``"0,4,8"``, ``-1``,
    a list; :mod:`featstore.layerspec`; a store lacking a requested layer skips it with a note);
    ``scope`` auto/clip/segment; ``class_weights`` among none/balanced/sampling; ``cv`` outer
    folds (speaker-grouped); ``n_jobs`` joblib workers (-1 = all cores); ``out_dir`` default
    ``cache/sweeps/<store stem>[+<stem>...]``; ``label_map`` e.g.
    ``"Lateral:Disordered,Interdental:Disordered"`` adds sensitivity/specificity columns;
    ``speaker_zscore`` standardises features with each speaker's own mean/std (label-free, but
    transductive: test speakers' feature statistics are used); ``backend`` a joblib backend name
    or None for the active ``joblib.parallel_config``; ``scheduler`` a Dask scheduler address
    (cells then run on that cluster); ``probe_params`` maps a probe name to extra ``make_probe``
    parameters (e.g. ``{"attn-mlp": {"epochs": 20}}``; part of the cell keys); ``nested`` chooses
    which configurations the true nested headline covers (:func:`nested_plan`), with
    ``inner_cv`` inner folds.
    """
    cfg = SweepConfig(
        stores=list(stores), layers=layers, scope=scope,
        poolings=tuple(poolings), probes=tuple(probes), class_weights=tuple(class_weights), cv=cv,
        n_jobs=n_jobs, out_dir=out_dir, seed=seed, label_map=label_map, speaker_zscore=speaker_zscore,
        backend=backend, progress=progress, quiet=quiet, n_boot=n_boot, probe_params=probe_params,
        nested=nested, inner_cv=inner_cv, scheduler=scheduler,
    )
    if cfg.scheduler:
        return _run_on_cluster(cfg)
    return Sweep(cfg).run()


def _run_on_cluster(cfg: SweepConfig) -> SweepResult:
    import joblib

    try:
        from dask.distributed import Client
    except ImportError:
        raise SweepError("--scheduler needs dask[distributed]: pip install 'featstore[dask]'") from None
    try:
        client = Client(cfg.scheduler, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"cannot reach the dask scheduler at {cfg.scheduler}: {exc}") from None
    cfg.backend = None
    with client, joblib.parallel_config(backend="dask"):
        return Sweep(cfg).run()


class Sweep:
    """A configured sweep; :meth:`run` fits the missing cells and writes the tables."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        from rich.console import Console

        self.console = Console(stderr=True, quiet=cfg.quiet)
        if not self.console.is_terminal:  # logs and pipes: wide enough for the results table
            self.console = Console(stderr=True, quiet=cfg.quiet, width=160)
        self.notes: list[str] = []

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        self.console.print(f"[yellow]note:[/] {msg}", highlight=False)

    def run(self) -> SweepResult:
        cfg = self.cfg
        notes: list[str] = []
        self.timings = {"prepare": 0.0, "features": 0.0, "fit": 0.0, "tables": 0.0, "write": 0.0}
        t0 = time.perf_counter()
        datas = [_prepare_store(p, cfg, notes) for p in cfg.stores]
        for n in notes:
            self._note(n)
        if cfg.speaker_zscore:
            self._note("speaker z-scoring uses each test speaker's own (unlabelled) feature statistics")
        cell_dir = cfg.out_dir / "cells"
        try:
            cell_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SweepError(f"cannot write the sweep output to {cfg.out_dir}: {exc.strerror or exc}") from None

        configs: list[tuple[StoreData, Config]] = []
        specs: dict[str, Any] = {}
        for sd in datas:
            config_notes: list[str] = []
            for conf, spec in _configs(sd, cfg, config_notes):
                configs.append((sd, conf))
                specs[conf.key] = spec
            for n in config_notes:
                self._note(n)
        if not configs:
            raise SweepError("nothing to sweep: no configuration applies to these stores and options")
        self.plan = nested_plan(cfg, datas, configs)
        if self.plan.reason:
            self._note(f"headline: {self.plan.reason}; it is chosen on the other outer folds (not nested)")
        cells: list[Cell] = []
        for sd, conf in configs:
            for f, (tr, te) in enumerate(sd.folds):
                cells.append(Cell(sd, conf, specs[conf.key], f, None, tr, te))
                if conf.key in self.plan.configs:
                    for j, (itr, ite) in enumerate(sd.inner[f]):
                        cells.append(Cell(sd, conf, specs[conf.key], f, j, itr, ite))
        for c in cells:
            c.key = cell_key(c.sd, c.conf, c.train, c.test, cfg)
        results: dict[str, dict] = {}
        todo = []
        for c in cells:
            res = _load_cell(cell_dir / f"{c.key}.json", len(c.test))
            if res is None:
                todo.append(c)
            else:
                results[c.key] = res
        n_cached = len(cells) - len(todo)
        self.timings["prepare"] = time.perf_counter() - t0
        n_inner = sum(c.inner is not None for c in cells)
        self.console.print(
            f"{len(configs)} configurations x folds = {len(cells) - n_inner} cells"
            + (f" + {n_inner} inner-fold cells for the nested headline" if n_inner else "")
            + f": {n_cached} cached, {len(todo)} to fit", highlight=False)
        if todo:
            t0 = time.perf_counter()
            self._fit(todo, results, cell_dir)
            self.timings["fit"] = time.perf_counter() - t0 - self.timings["features"]
        t0 = time.perf_counter()
        folds, summary, predictions, inner = self._tables(datas, configs, cells, results)
        best = self._best(datas, folds, summary, inner)
        self.timings["tables"] = time.perf_counter() - t0
        result = SweepResult(folds, summary, predictions, best, out_dir=cfg.out_dir, n_cells=len(cells),
                             n_fitted=len(todo), n_cached=n_cached, notes=self.notes, timings=self.timings, inner=inner)
        t0 = time.perf_counter()
        self._write(result, datas)
        self.timings["write"] = time.perf_counter() - t0
        self._print(result)
        return result

    # -- fitting --------------------------------------------------------------------------
    def _fit(self, todo: list[Cell], results: dict, cell_dir: Path) -> None:
        import joblib
        from joblib import Parallel, delayed

        cfg = self.cfg
        if cfg.backend in ("loky", "multiprocessing", "threading", "sequential"):
            n_threads = max(1, (os.cpu_count() or 1) // max(1, joblib.effective_n_jobs(cfg.n_jobs)))
        else:  # a cluster (e.g. dask): one thread per task, the scheduler fills the cores
            n_threads = 1
        cost = {"frames": 0, "layers": 1, "pooled": 2}
        # batches: one per (store, layer) so that only one layer's features are in memory
        batches: dict[tuple[str, str], list[Cell]] = {}
        for c in todo:
            batches.setdefault((c.sd.name, c.conf.layer), []).append(c)
        progress = _progress(self.console, cfg.progress and not cfg.quiet, len(todo))
        kwargs = {} if cfg.backend is None else {"backend": cfg.backend}
        with progress, Parallel(n_jobs=cfg.n_jobs, return_as="generator_unordered", **kwargs) as parallel:
            task = progress.add_task("fitting", total=len(todo))
            for (_, layer), items in batches.items():
                sd = items[0].sd
                feats: dict[tuple, Any] = {}
                t_feat = time.perf_counter()
                with open_store(sd.path) as store:
                    for c in items:
                        fkey = _feature_key(c.conf)
                        if fkey not in feats:
                            progress.update(task, description=f"{sd.name} L{layer} {c.conf.pooling}: pooling")
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                feats[fkey] = _features(store, sd, c.conf, c.spec, cfg)
                self.timings["features"] += time.perf_counter() - t_feat
                items = sorted(items, key=lambda c: cost[probe_input_kind(c.conf.probe)])
                calls = [delayed(_tagged)(c.key, fit_cell, feats[_feature_key(c.conf)], c.sd.y, c.train, c.test,
                                          c.conf.probe, c.conf.class_weight, len(c.sd.classes), cfg.seed, n_threads,
                                          c.sd.fit_groups, cfg.probe_params.get(c.conf.probe))
                         for c in items]
                meta = {c.key: c for c in items}
                progress.update(task, description=f"{sd.name} L{layer}: fitting")
                for key, res in parallel(calls):
                    results[key] = res
                    _save_cell(cell_dir / f"{key}.json", res, meta[key])
                    progress.advance(task)
                del feats

    # -- tables ---------------------------------------------------------------------------
    def _tables(self, datas: list[StoreData], configs: list, cells: list[Cell], results: dict):
        cfg = self.cfg
        fold_rows, summ_rows, pred_frames, inner_rows = [], [], [], []
        outer_key = {(c.conf.key, c.fold): c.key for c in cells if c.inner is None}
        for c in cells:
            if c.inner is not None:
                res = results[c.key]
                inner_rows.append({"store": c.sd.name, "config": c.conf.key, "probe": c.conf.probe, "fold": c.fold,
                                   "inner_fold": c.inner, "n_train": len(c.train), "n_test": len(c.test),
                                   "balanced_accuracy": M.balanced_accuracy(c.sd.y[c.test], res["pred"], len(c.sd.classes)),
                                   "fit_seconds": res["fit_seconds"], "fit_cpu_seconds": res["fit_cpu_seconds"]})
        for sd in datas:
            k = len(sd.classes)
            split = M.binary_split(cfg.label_map, sd.classes) if cfg.label_map else None
            fold_of = fold_ids(sd.folds, len(sd.y))
            base = self._baselines(sd, split)
            fold_rows += base["folds"]
            summ_rows += base["summary"]
            base_cols = {"majority_bacc": base["majority_bacc"], "chance_bacc": base["chance_bacc"]}
            for sd_, conf in configs:
                if sd_ is not sd:
                    continue
                pred = np.full(len(sd.y), -1, dtype=np.int64)
                proba = np.full((len(sd.y), k), np.nan)
                rows = []
                for f, (tr, te) in enumerate(sd.folds):
                    res = results[outer_key[(conf.key, f)]]
                    pred[te], proba[te] = res["pred"], res["proba"]
                    row = {**asdict(conf), "fold": f,
                           **M.fold_metrics(sd.y[te], res["pred"], res["proba"], sd.classes)}
                    if split:
                        row.update(M.binary_metrics(sd.y[te], res["pred"], res["proba"], split[2]))
                    row.update(fit_seconds=res["fit_seconds"], fit_cpu_seconds=res["fit_cpu_seconds"],
                               n_train=len(tr), n_test=len(te),
                               majority_bacc=base["fold_majority"][f], chance_bacc=base["fold_chance"][f],
                               config=conf.key)
                    rows.append(row)
                fold_rows += rows
                summ_rows.append(self._summarise(conf, rows, sd, pred, base_cols))
                pdf = pd.DataFrame({"store": sd.name, "config": conf.key, "id": sd.ids, "group": sd.groups,
                                    "label": sd.labels, "fold": fold_of,
                                    "pred": np.asarray(sd.classes, dtype=object)[pred]})
                for c, name in enumerate(sd.classes):
                    pdf[f"proba_{name}"] = np.round(proba[:, c], 6)
                pred_frames.append(pdf)
        folds = pd.DataFrame(fold_rows)
        summary = pd.DataFrame(summ_rows)
        predictions = pd.concat(pred_frames, ignore_index=True) if pred_frames else pd.DataFrame()
        inner = pd.DataFrame(inner_rows, columns=["store", "config", "probe", "fold", "inner_fold", "n_train",
                                                  "n_test", "balanced_accuracy", "fit_seconds", "fit_cpu_seconds"])
        return folds, summary, predictions, inner

    def _summarise(self, conf: Config, rows: list[dict], sd: StoreData, pred: np.ndarray, base_cols: dict) -> dict:
        df = pd.DataFrame(rows)
        out: dict[str, Any] = {**asdict(conf), "n_folds": len(rows), "n_items": len(sd.y)}
        for m in M.METRICS:
            vals = df[m].to_numpy(dtype=float)
            out[f"{m}_mean"] = M.nanmean(vals)
            out[f"{m}_std"] = float(np.nanstd(vals)) if (~np.isnan(vals)).any() else float("nan")
        if pred is not None and (pred >= 0).all():
            out["bacc_oof"] = M.balanced_accuracy(sd.y, pred, len(sd.classes))
            out["bacc_ci_low"], out["bacc_ci_high"] = bootstrap_ci(
                sd.y, pred, sd.groups, len(sd.classes), n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        for c in sd.classes:
            out[f"recall_{c}"] = M.nanmean(df[f"recall_{c}"])
        for m in M.BINARY_METRICS:
            if m in df:
                out[f"{m}_mean"] = M.nanmean(df[m])
        out["fit_seconds"] = float(df["fit_seconds"].sum())
        out["fit_cpu_seconds"] = float(df["fit_cpu_seconds"].sum())
        out.update(base_cols)
        out["config"] = conf.key
        return out

    def _baselines(self, sd: StoreData, split) -> dict:
        """Fold rows and summary rows of the majority and chance baselines of this store's folds."""
        k, cfg = len(sd.classes), self.cfg
        fold_rows, fm, fc = [], [], []
        maj_pred = np.full(len(sd.y), -1, dtype=np.int64)
        boot_groups = fill_groups(sd.groups)
        chance_conf = np.zeros((len(np.unique(boot_groups.astype(str))), k, k))
        for f, (tr, te) in enumerate(sd.folds):
            pred, proba = M.majority_baseline(sd.y[tr], len(te), k)
            maj_pred[te] = pred
            m_row = M.fold_metrics(sd.y[te], pred, proba, sd.classes)
            if split:
                m_row.update(M.binary_metrics(sd.y[te], pred, proba, split[2]))
            c_row, draws = M.chance_baseline(sd.y[tr], sd.y[te], sd.classes, N_CHANCE_DRAWS, seed=cfg.seed + f)
            if split:
                per = [M.binary_metrics(sd.y[te], d, proba, split[2]) for d in draws]
                c_row.update({key: M.nanmean([p[key] for p in per]) for key in per[0]})
            # expected per-speaker confusions of the chance guesses (for the bootstrap interval)
            mask = np.zeros(len(sd.y), bool)
            mask[te] = True
            for d in range(N_CHANCE_DRAWS):
                guess = np.zeros(len(sd.y), dtype=np.int64)
                guess[te] = draws[d]
                chance_conf += _group_conf_masked(sd.y, guess, boot_groups, mask, k) / N_CHANCE_DRAWS
            fm.append(m_row["balanced_accuracy"])
            fc.append(c_row["balanced_accuracy"])
            for probe, row in (("majority", m_row), ("chance", c_row)):
                fold_rows.append({"store": sd.name, "encoder": sd.encoder, "layer": "-", "scope": sd.scope,
                                  "pooling": "-", "probe": probe, "class_weight": "-", "fold": f, **row,
                                  "fit_seconds": 0.0, "fit_cpu_seconds": 0.0, "n_train": len(tr), "n_test": len(te),
                                  "majority_bacc": fm[-1], "chance_bacc": fc[-1],
                                  "config": f"{sd.name}|{probe}"})
        maj_bacc, ch_bacc = M.nanmean(fm), M.nanmean(fc)
        summary = []
        for probe in BASELINES:
            conf = Config(sd.name, sd.encoder, "-", sd.scope, "-", probe, "-")
            rows = [r for r in fold_rows if r["probe"] == probe]
            row = self._summarise(conf, rows, sd, maj_pred if probe == "majority" else None,
                                  {"majority_bacc": maj_bacc, "chance_bacc": ch_bacc})
            row["config"] = f"{sd.name}|{probe}"
            if probe == "chance":
                row["bacc_oof"] = float(M.bacc_from_confusion(chance_conf.sum(axis=0)))
                row["bacc_ci_low"], row["bacc_ci_high"] = bootstrap_confusions(chance_conf, cfg.n_boot, seed=cfg.seed)
            summary.append(row)
        return {"folds": fold_rows, "summary": summary, "fold_majority": fm, "fold_chance": fc,
                "majority_bacc": maj_bacc, "chance_bacc": ch_bacc}

    # -- headline -------------------------------------------------------------------------
    def _headline(self, names: list[str], fp: pd.DataFrame, inner: pd.DataFrame) -> dict:
        """The headline of one store, or of several stores sharing identical folds."""
        fp = fp[fp["store"].isin(names)]
        n_all = int(fp["config"].nunique())
        other = S.other_folds_selection(fp)
        other.update(description=S.describe(S.OTHER_FOLDS, n_configs=n_all), n_configs=n_all)
        sub = inner[inner["store"].isin(names)] if len(inner) else inner
        if self.plan.enabled and len(sub):
            nested = S.nested_selection(sub, fp)
            n_nested = int(sub["config"].nunique())
            nested.update(description=S.describe(S.NESTED, self.cfg.inner_cv, n_nested, self.plan.scope),
                          n_configs=n_nested, inner_cv=self.cfg.inner_cv,
                          probes=sorted(set(sub["probe"])), stores=names)
            return {"headline": nested, "other_folds": other}
        other["stores"] = names
        return {"headline": dict(other), "other_folds": other}

    def _best(self, datas: list[StoreData], folds: pd.DataFrame, summary: pd.DataFrame, inner: pd.DataFrame) -> dict:
        probes_only = summary[~summary["probe"].isin(BASELINES)]
        fp = folds[~folds["probe"].isin(BASELINES)]
        out: dict[str, Any] = {"metric": "balanced_accuracy", "cv": self.cfg.cv, "seed": self.cfg.seed,
                               "n_configs": int(len(probes_only)),
                               "nested": {"mode": self.plan.mode, "inner_cv": self.cfg.inner_cv,
                                          "n_configs": self.plan.n_configs, "covers": self.plan.scope,
                                          "not_nested_because": self.plan.reason or None}}
        if not len(probes_only):
            return out
        # controls and padded-recipe stores are compared, never chosen as the headline or naive best
        tagged = {sd.name for sd in datas if sd.tags}
        candidates = probes_only[~probes_only["store"].isin(tagged)]
        if not len(candidates):
            candidates = probes_only
        top = candidates.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True]).iloc[0]
        out["naive_best"] = _jsonable(top.to_dict())
        out["baselines"] = {s: {"majority_bacc": float(g["majority_bacc"].iloc[0]),
                                "chance_bacc": float(g["chance_bacc"].iloc[0])}
                            for s, g in summary.groupby("store", sort=False)}
        out["per_store"] = {}
        for sd in datas:
            sub = probes_only[probes_only["store"] == sd.name]
            if not len(sub):
                continue
            st = sub.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True]).iloc[0]
            out["per_store"][sd.name] = {**self._headline([sd.name], fp, inner),
                                         "naive_best_config": st["config"],
                                         "naive_best_bacc": float(st["balanced_accuracy_mean"])}
        # one headline across the stores only where their folds are identical
        scored = [sd for sd in datas if sd.name in out["per_store"]]
        trained = [sd for sd in scored if not sd.tags]
        if trained and len(trained) < len(scored):
            out["headline_excludes"] = [sd.name for sd in scored if sd.tags]
            scored = trained
        sigs = {sd.name: sd.fold_signature() for sd in scored}
        names = list(sigs)
        if len(names) == 1:
            h = out["per_store"][names[0]]
            out.update(headline=h["headline"], other_folds=h["other_folds"])
        elif len(set(sigs.values())) == 1:
            out.update(self._headline(names, fp, inner))
        else:
            out["headline_note"] = ("the stores have different folds (items, labels or speakers differ): each "
                                    "store's headline is chosen on its own folds, and no headline spans stores")
        if "headline" in out:
            h = out["headline"]
            out["headline_method"], out["headline_bacc"] = h["method"], h["bacc"]
            if h["method"] == S.NESTED:
                out["nested_bacc"] = h["bacc"]
            out["other_folds_bacc"] = out["other_folds"]["bacc"]
        return out

    # -- output ---------------------------------------------------------------------------
    def _write(self, res: SweepResult, datas: list[StoreData]) -> None:
        out = self.cfg.out_dir
        tables.write_csv(res.folds, out / "folds.csv")
        tables.write_csv(res.summary, out / "summary.csv")
        tables.write_csv(res.predictions, out / "predictions.csv")
        tables.write_csv(res.inner, out / "inner_folds.csv")
        tables.write_csv(pd.concat([d.fold_info for d in datas], ignore_index=True), out / "fold_info.csv")
        tables.write_json(res.best, out / "best.json")
        self.provenance = {d.name: store_provenance(d.path, d.name) for d in datas}
        tables.write_json(self.provenance, out / "stores.json")
        settings = {k: v for k, v in asdict(self.cfg).items()}
        settings["stores"] = [str(p) for p in self.cfg.stores]
        settings["classes"] = {d.name: d.classes for d in datas}
        tables.write_json(settings, out / "sweep.json")

    def _print(self, res: SweepResult) -> None:
        if self.cfg.quiet:
            return
        from rich.markup import escape
        from rich.table import Table

        s = res.summary
        probes_only = s[~s["probe"].isin(BASELINES)].sort_values(
            ["balanced_accuracy_mean", "config"], ascending=[False, True]).head(self.cfg.top)
        labels = provenance_labels(self.provenance)
        # the store column whenever there are several stores or one is a control / padded store
        multi = s["store"].nunique() > 1 or any(labels[n] != n for n in labels)
        table = Table(title=f"Best configurations (balanced accuracy, {self.cfg.cv}-fold speaker-grouped CV)")
        cols = (["store"] if multi else []) + ["layer", "scope", "pooling", "probe", "weights", "bacc", "95% CI",
                                               "macro-F1", "AUC", "majority", "chance"]
        for c in cols:
            table.add_column(c, justify="right" if c in ("layer", "bacc", "95% CI", "macro-F1", "AUC", "majority", "chance") else "left")
        for _, r in probes_only.iterrows():
            cells = ([escape(labels.get(r["store"], r["store"]))] if multi else []) + [
                str(r["layer"]), r["scope"], r["pooling"], r["probe"], r["class_weight"],
                f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f}",
                f"{r.get('bacc_ci_low', np.nan):.3f}-{r.get('bacc_ci_high', np.nan):.3f}",
                f"{r['macro_f1_mean']:.3f}", f"{r['roc_auc_ovr_mean']:.3f}",
                f"{r['majority_bacc']:.3f}", f"{r['chance_bacc']:.3f}"]
            table.add_row(*cells)
        self.console.print(table)
        for line in headline_lines(res.best, labels):
            self.console.print(line, highlight=False, markup=False)
        self.console.print(f"results in {res.out_dir} ({res.n_fitted} cells fitted, {res.n_cached} reused)", highlight=False)


def headline_lines(best: dict, labels: dict[str, str] | None = None) -> list[str]:
    """The printed headline: what was selected how, the not-nested and naive numbers beside it;
    stores named by ``labels`` (:func:`probes.names.store_label`) where given."""
    if "naive_best" not in best:
        return []
    labels = labels or {}
    lines = []

    def one(prefix: str, entry: dict) -> None:
        h, o = entry["headline"], entry["other_folds"]
        lines.append(f"{prefix}headline balanced accuracy {h['bacc']:.3f} — {h['description']}")
        if h["method"] == S.NESTED:
            lines.append(f"{prefix}  for comparison, {o['description']}: {o['bacc']:.3f}")

    if "headline" in best:
        names = best["headline"].get("stores") or list(best.get("per_store", {}))
        tagged = any(labels.get(n, n) != n for n in names)
        one(", ".join(labels.get(n, n) for n in names) + ": " if tagged else "", best)
    for name, entry in best.get("per_store", {}).items():
        if "headline" not in best or len(best["per_store"]) > 1:
            one(f"{labels.get(name, name)}: ", entry)
    if best.get("headline_note"):
        lines.append(f"note: {best['headline_note']}")
    if best.get("headline_excludes"):
        lines.append(f"note: {S.excludes_note(best['headline_excludes'], labels)}")
    nb = best["naive_best"]
    lines.append(f"naive best {nb['balanced_accuracy_mean']:.3f} ({nb['config']}; chosen on the folds that score "
                 "it, so optimistic); " + "; ".join(f"{labels.get(st, st)}: majority {v['majority_bacc']:.3f}, chance "
                                                   f"{v['chance_bacc']:.3f}" for st, v in best["baselines"].items()))
    return lines


def _feature_key(conf: Config) -> tuple[str, str]:
    kind = probe_input_kind(conf.probe)
    return (conf.probe if kind != "pooled" else "pooled", conf.pooling)


def _tagged(key: str, fn, *args) -> tuple[str, dict]:
    return key, fn(*args)


def _group_conf_masked(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Per-group confusions counting only ``mask`` items (all groups present, sorted)."""
    names, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    idx = (g[mask] * k + y[mask]) * k + pred[mask]
    return np.bincount(idx, minlength=len(names) * k * k).reshape(len(names), k, k).astype(np.float64)


def _progress(console, enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def _jsonable(d: dict) -> dict:
    return {k: tables.jsonable(v) for k, v in d.items()}

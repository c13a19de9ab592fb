"""The probe sweep: (store, layer, scope, pooling, probe, class weighting, fold) cells in parallel.

A *configuration* is (store, layer, scope, pooling, probe, class weighting); a *cell* is a
configuration on one fold. Pooled-input probes (``logreg``, ``xgb``) take every pooling; the
attentive MLP (``attn-mlp``) reads the frames and pools by itself (pooling column ``attention``);
``weighted-layers`` learns a weighted sum of all swept layers' mean-pooled vectors (layer column
``all``, pooling ``mean``). Both ignore ``poolings``.

How a sweep runs (:func:`run_sweep`):

1. per store, the usable items are those with ``status == ok`` and a non-empty label (the others
   are skipped with a printed note); the folds (:func:`probes.cv.make_folds`, speaker-grouped,
   seeded) are made once and shared by every configuration of that store;
2. per layer, the parent process pools the features (cached in the store's ``pooled/`` group) and
   ships only arrays to the workers (joblib ``Parallel(n_jobs, backend=backend)``; ``backend=None``
   uses whatever ``joblib.parallel_config`` is active, e.g. ``"dask"``);
3. each finished cell is saved as ``out_dir/cells/<key>.json`` where ``key`` hashes the store's
   content identity (:func:`store_identity`), the configuration, the seed, the z-scoring flag and
   the fold's train/test items; a re-run loads finished cells instead of fitting them again;
4. out-of-fold predictions are scored (:mod:`probes.metrics`) beside the ``majority`` and
   ``chance`` baselines of the same folds, and written to ``folds.csv``, ``summary.csv``,
   ``predictions.csv`` and ``best.json`` (see :func:`nested_selection` for the honest headline).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from featstore.store import OK, Store, open_store
from probes import metrics as M
from probes.cv import describe_folds, fold_ids, make_folds

#: bump when the meaning of a cached cell changes
CELL_VERSION = 1
PROBES = ("logreg", "xgb", "attn-mlp", "weighted-layers")
CLASS_WEIGHTS = ("none", "balanced", "sampling")
DEFAULT_POOLINGS = ("mean", "stats", "max", "center")
DEFAULT_PROBES = ("logreg", "xgb", "attn-mlp")
DEFAULT_CLASS_WEIGHTS = ("none", "balanced")
#: pooling column of the probes that pool by themselves
SELF_POOLING = {"frames": "attention", "layers": "mean"}
BASELINES = ("majority", "chance")
ID_COLUMNS = ("store", "encoder", "layer", "scope", "pooling", "probe", "class_weight")
N_CHANCE_DRAWS = 10


class SweepError(ValueError):
    """A sweep cannot run with these inputs (a user error: bad file, option or data)."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """Everything that defines a sweep (see :func:`run_sweep` for the meaning of each field)."""

    stores: list[Path]
    layers: list[int] | None = None
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

    def __post_init__(self) -> None:
        self.stores = [Path(p) for p in self.stores]
        if not self.stores:
            raise SweepError("no store given")
        for p in self.stores:
            if not p.exists():
                raise SweepError(f"no store at {p}")
        names = [p.stem for p in self.stores]
        if len(set(names)) != len(names):
            raise SweepError(f"two stores share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; rename one")
        from probes.pooling import POOLINGS, SCOPES

        self.poolings = _check_names(self.poolings, POOLINGS, "pooling")
        self.probes = _check_names(self.probes, PROBES, "probe")
        self.class_weights = _check_names(
            ["none" if c in (None, "None") else c for c in self.class_weights], CLASS_WEIGHTS, "class weight")
        if self.scope not in SCOPES:
            raise SweepError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.cv < 2:
            raise SweepError(f"cv must be at least 2, got {self.cv}")
        if self.layers is not None:
            self.layers = sorted({int(k) for k in self.layers})
        self.label_map = M.parse_label_map(self.label_map) if not isinstance(self.label_map, dict) else self.label_map
        self.probe_params = {k: dict(v) for k, v in (self.probe_params or {}).items()}
        for k in self.probe_params:
            if k not in PROBES:
                raise SweepError(f"probe_params names unknown probe {k!r}; use one of {', '.join(PROBES)}")
        if self.out_dir is None:
            self.out_dir = Path("cache") / "sweeps" / "+".join(names)
        self.out_dir = Path(self.out_dir)


def parse_layers(spec: str | int | Sequence | None) -> list[int] | None:
    """``"0-12"``, ``"0-3,6"``, ``"all"`` -> sorted layer indices, or None for every layer.

    ``all`` anywhere in the list means every layer of each store.
    """
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    parts = [str(p).strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    if not any(parts):
        raise SweepError("empty layer spec: use e.g. 0-12, 0-3,6 or all")
    out: set[int] = set()
    for part in parts:
        if not part:
            continue
        if part.lower() == "all":
            return None
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise SweepError(f"bad layer spec {part!r}: use e.g. 0-12, 0-3,6 or all") from None
        if a < 0 or b < a:
            raise SweepError(f"bad layer range {part!r}: use increasing non-negative layers, e.g. 0-12")
        out.update(range(a, b + 1))
    return sorted(out)


def _check_names(values: Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
    if not values:
        raise SweepError(f"no {what} given; use one or more of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise SweepError(f"unknown {what} {v!r}; use one or more of {', '.join(allowed)}")
    return values


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


# ---------------------------------------------------------------------------------------------
# Per-store data
# ---------------------------------------------------------------------------------------------
def store_identity(store: Store) -> str:
    """Hash of what a probe result depends on: provenance attributes, the items table, layer shapes.

    The pooled cache (which the sweep itself writes into the file) is left out, so filling it does
    not invalidate finished cells; re-extracting a store changes ``created_at`` and does.
    """
    attrs = store.attrs
    h = hashlib.sha256()
    keep = ("format_version", "encoder", "encoder_revision", "encoder_config", "manifest_sha256",
            "created_at", "num_layers", "dtype", "sample_rate")
    h.update(json.dumps({k: str(attrs.get(k)) for k in keep}, sort_keys=True).encode())
    for col in ("id", "label", "group", "status", "num_frames", "offset", "segment_start_frame",
                "segment_end_frame", "sha256"):
        if col in store.h5["items"]:
            h.update(col.encode())
            h.update("\x1f".join(map(str, store.column(col))).encode())
    for name in sorted(store.h5["layers"]):
        h.update(f"{name}:{store.h5['layers'][name].shape}".encode())
    return h.hexdigest()


def store_layers(store: Store) -> list[int]:
    """Layer indices held by a store (``layers/NN`` names)."""
    ids = getattr(store, "layer_ids", None)
    return list(ids) if ids is not None else list(range(store.num_layers))


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
        if cfg.layers is None:
            layers = have
        else:
            layers = [k for k in cfg.layers if k in have]
            missing = [k for k in cfg.layers if k not in have]
            if not layers:
                raise SweepError(f"{path} has none of the layers {_fmt_layers(cfg.layers)} (it has {_fmt_layers(have)})")
            if missing:
                notes.append(f"{name}: has no layer {_fmt_layers(missing)}; swept {_fmt_layers(layers)}")
        dims = {k: int(store.h5["layers"][f"{k:02d}"].shape[1]) for k in layers}
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
        return StoreData(
            path=path, name=name, encoder=str(store.attrs.get("encoder", "")), identity=store_identity(store),
            scope=scope, rows=rows, ids=store.column("id")[rows], labels=lab, groups=groups,
            classes=[str(c) for c in classes], y=y.astype(np.int64), folds=folds, layers=layers,
            layer_dims=dims, fold_info=describe_folds(folds, lab, groups).assign(store=name),
        )


def _fmt_layers(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers))


def _configs(sd: StoreData, cfg: SweepConfig, notes: list[str] | None = None) -> list[tuple[Config, Any]]:
    """``(Config, layer spec)`` pairs of one store in a fixed order; layer spec = int or list."""
    from probes.estimators import probe_input_kind

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


def _cell_key(sd: StoreData, conf: Config, fold: int, cfg: SweepConfig) -> str:
    tr, te = sd.folds[fold]
    h = hashlib.sha256()
    payload = {
        "v": CELL_VERSION, "store": sd.identity, "layer": conf.layer, "scope": conf.scope,
        "pooling": conf.pooling, "probe": conf.probe, "class_weight": conf.class_weight,
        "seed": cfg.seed, "zscore": bool(cfg.speaker_zscore), "classes": sd.classes,
        "layers": sd.layers if conf.layer == "all" else None,
        "params": cfg.probe_params.get(conf.probe, {}),
    }
    h.update(json.dumps(payload, sort_keys=True).encode())
    h.update(np.ascontiguousarray(sd.rows[tr], dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(sd.rows[te], dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


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


def _zscore_frames(seqs: list[np.ndarray], groups: np.ndarray, eps: float = 1e-8) -> list[np.ndarray]:
    _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    out = list(seqs)
    for k in range(g.max() + 1 if len(g) else 0):
        idx = np.flatnonzero(g == k)
        cat = np.concatenate([seqs[i] for i in idx]).astype(np.float64)
        mu, sd = cat.mean(axis=0), cat.std(axis=0)
        sd = np.where(sd < eps, 1.0, sd)
        for i in idx:
            out[i] = ((seqs[i] - mu) / sd).astype(np.float32)
    return out


class FrameBatch:
    """Frame sequences packed into one array (cheap to ship to workers); ``seqs()`` unpacks views."""

    def __init__(self, seqs: list[np.ndarray]):
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.data = np.concatenate(seqs).astype(np.float32) if seqs else np.zeros((0, 0), np.float32)

    def seqs(self, idx: np.ndarray) -> list[np.ndarray]:
        bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        return [self.data[bounds[i]: bounds[i + 1]] for i in idx]


def _features(store: Store, sd: StoreData, conf: Config, layer_spec: Any, cfg: SweepConfig) -> Any:
    from probes.estimators import probe_input_kind
    from probes.pooling import all_layers_matrix, frame_sequences, pooled_matrix

    kind = probe_input_kind(conf.probe)
    if kind == "pooled":
        x = pooled_matrix(store, layer_spec, conf.pooling, sd.scope, sd.rows, cache=True)
        return zscore_by_group(x, sd.groups) if cfg.speaker_zscore else x
    if kind == "layers":
        x = all_layers_matrix(store, conf.pooling, sd.scope, layer_spec, sd.rows)
        if cfg.speaker_zscore:
            x = np.stack([zscore_by_group(x[:, j], sd.groups) for j in range(x.shape[1])], axis=1)
        return x
    seqs = frame_sequences(store, layer_spec, sd.scope, sd.rows)
    if cfg.speaker_zscore:
        seqs = _zscore_frames(seqs, sd.groups)
    return FrameBatch(seqs)


# ---------------------------------------------------------------------------------------------
# One cell (worker process)
# ---------------------------------------------------------------------------------------------
def fit_cell(
    x: Any, y: np.ndarray, train: np.ndarray, test: np.ndarray, probe: str, class_weight: str,
    n_classes: int, seed: int = 0, n_threads: int = 1, groups: np.ndarray | None = None,
    params: dict | None = None,
) -> dict:
    """Fit one probe on ``train`` and predict ``test``: ``{"pred", "proba", "fit_seconds"}``.

    ``proba`` has one column per global class (zeros for classes absent from the training fold).
    ``groups`` (speakers) make the probe's own inner splits (early stopping, C search) grouped.
    """
    from probes.estimators import make_probe

    cw = None if class_weight == "none" else class_weight
    est = make_probe(probe, class_weight=cw, random_state=seed, n_threads=n_threads, **(params or {}))
    if isinstance(x, FrameBatch):
        x_tr, x_te = x.seqs(train), x.seqs(test)
    else:
        x_tr, x_te = x[train], x[test]
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if groups is not None and (groups != "").all():
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
    except (OSError, ValueError, KeyError):
        return None
    return out if len(out["pred"]) == n_test else None


def _save_cell(path: Path, res: dict, conf: Config, fold: int) -> None:
    data = {"config": asdict(conf), "fold": fold, "fit_seconds": res["fit_seconds"],
            "fit_cpu_seconds": res["fit_cpu_seconds"],
            "pred": res["pred"].tolist(), "proba": res["proba"].tolist()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def run_sweep(
    stores: Sequence[str | os.PathLike],
    layers: Sequence[int] | None = None,
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
) -> SweepResult:
    """Run (or resume) a sweep and write its tables to ``out_dir``.

    ``layers`` None = every layer of each store (a store lacking a requested layer skips it with a
    note); ``scope`` auto/clip/segment; ``class_weights`` among none/balanced/sampling;
    ``cv`` outer folds (speaker-grouped); ``n_jobs`` joblib workers (-1 = all cores);
    ``out_dir`` default ``cache/sweeps/<store stem>[+<stem>...]``; ``label_map`` e.g.
    ``"Lateral:Disordered,Interdental:Disordered"`` adds sensitivity/specificity columns;
    ``speaker_zscore`` standardises features with each speaker's own mean/std (label-free, but
    transductive: test speakers' feature statistics are used); ``backend`` a joblib backend name
    or None for the active ``joblib.parallel_config`` (e.g. ``"dask"``); ``probe_params`` maps a
    probe name to extra ``make_probe`` parameters (e.g. ``{"attn-mlp": {"epochs": 20}}``); they
    are part of the cell cache key.
    """
    cfg = SweepConfig(
        stores=list(stores), layers=list(layers) if layers is not None else None, scope=scope,
        poolings=tuple(poolings), probes=tuple(probes), class_weights=tuple(class_weights), cv=cv,
        n_jobs=n_jobs, out_dir=out_dir, seed=seed, label_map=label_map, speaker_zscore=speaker_zscore,
        backend=backend, progress=progress, quiet=quiet, n_boot=n_boot, probe_params=probe_params,
    )
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
        cell_dir.mkdir(parents=True, exist_ok=True)

        # enumerate cells
        plan = []  # (sd, conf, layer_spec, fold, key)
        configs: list[tuple[StoreData, Config]] = []
        for sd in datas:
            config_notes: list[str] = []
            for conf, spec in _configs(sd, cfg, config_notes):
                configs.append((sd, conf))
                for f in range(len(sd.folds)):
                    plan.append((sd, conf, spec, f, _cell_key(sd, conf, f, cfg)))
            for n in config_notes:
                self._note(n)
        if not plan:
            raise SweepError("nothing to sweep: no configuration applies to these stores and options")
        results: dict[str, dict] = {}
        todo = []
        for item in plan:
            sd, conf, spec, f, key = item
            res = _load_cell(cell_dir / f"{key}.json", len(sd.folds[f][1]))
            if res is None:
                todo.append(item)
            else:
                results[key] = res
        n_cached = len(plan) - len(todo)
        self.timings["prepare"] = time.perf_counter() - t0
        self.console.print(
            f"{len(configs)} configurations x folds = {len(plan)} cells: {n_cached} cached, {len(todo)} to fit",
            highlight=False)
        if todo:
            t0 = time.perf_counter()
            self._fit(todo, results, cell_dir)
            self.timings["fit"] = time.perf_counter() - t0 - self.timings["features"]
        t0 = time.perf_counter()
        tables = self._tables(datas, configs, results)
        self.timings["tables"] = time.perf_counter() - t0
        result = SweepResult(*tables, out_dir=cfg.out_dir, n_cells=len(plan), n_fitted=len(todo),
                             n_cached=n_cached, notes=self.notes, timings=self.timings)
        t0 = time.perf_counter()
        self._write(result, datas)
        self.timings["write"] = time.perf_counter() - t0
        self._print(result)
        return result

    # -- fitting --------------------------------------------------------------------------
    def _fit(self, todo: list, results: dict, cell_dir: Path) -> None:
        import joblib
        from joblib import Parallel, delayed

        from probes.estimators import probe_input_kind

        cfg = self.cfg
        if cfg.backend in ("loky", "multiprocessing", "threading", "sequential"):
            n_threads = max(1, (os.cpu_count() or 1) // max(1, joblib.effective_n_jobs(cfg.n_jobs)))
        else:  # a cluster (e.g. dask): one thread per task, the scheduler fills the cores
            n_threads = 1
        cost = {"frames": 0, "layers": 1, "pooled": 2}
        # batches: one per (store, layer) so that only one layer's features are in memory
        batches: dict[tuple[str, str], list] = {}
        for item in todo:
            sd, conf = item[0], item[1]
            batches.setdefault((sd.name, conf.layer), []).append(item)
        progress = _progress(self.console, cfg.progress and not cfg.quiet, len(todo))
        kwargs = {} if cfg.backend is None else {"backend": cfg.backend}
        with progress, Parallel(n_jobs=cfg.n_jobs, return_as="generator_unordered", **kwargs) as parallel:
            task = progress.add_task("fitting", total=len(todo))
            for (_, layer), items in batches.items():
                sd = items[0][0]
                feats: dict[tuple, Any] = {}
                t_feat = time.perf_counter()
                with open_store(sd.path) as store:
                    for _, conf, spec, _, _ in items:
                        fkey = (conf.probe if probe_input_kind(conf.probe) != "pooled" else "pooled", conf.pooling)
                        if fkey not in feats:
                            progress.update(task, description=f"{sd.name} L{layer} {conf.pooling}: pooling")
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                feats[fkey] = _features(store, sd, conf, spec, cfg)
                self.timings["features"] += time.perf_counter() - t_feat
                items = sorted(items, key=lambda it: cost[probe_input_kind(it[1].probe)])
                calls = []
                for sd_, conf, spec, f, key in items:
                    fkey = (conf.probe if probe_input_kind(conf.probe) != "pooled" else "pooled", conf.pooling)
                    tr, te = sd_.folds[f]
                    calls.append(delayed(_tagged)(key, fit_cell, feats[fkey], sd_.y, tr, te, conf.probe,
                                                  conf.class_weight, len(sd_.classes), cfg.seed, n_threads, sd_.groups,
                                                  cfg.probe_params.get(conf.probe)))
                meta = {it[4]: (it[1], it[3]) for it in items}
                progress.update(task, description=f"{sd.name} L{layer}: fitting")
                for key, res in parallel(calls):
                    results[key] = res
                    conf, f = meta[key]
                    _save_cell(cell_dir / f"{key}.json", res, conf, f)
                    progress.advance(task)
                del feats

    # -- tables ---------------------------------------------------------------------------
    def _tables(self, datas: list[StoreData], configs: list, results: dict):
        cfg = self.cfg
        fold_rows, summ_rows, pred_frames = [], [], []
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
                    res = results[_cell_key(sd, conf, f, cfg)]
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
        best = self._best(folds, summary)
        return folds, summary, predictions, best

    def _summarise(self, conf: Config, rows: list[dict], sd: StoreData, pred: np.ndarray, base_cols: dict) -> dict:
        df = pd.DataFrame(rows)
        out: dict[str, Any] = {**asdict(conf), "n_folds": len(rows), "n_items": len(sd.y)}
        for m in M.METRICS:
            vals = df[m].to_numpy(dtype=float)
            out[f"{m}_mean"] = M.nanmean(vals)
            out[f"{m}_std"] = float(np.nanstd(vals)) if (~np.isnan(vals)).any() else float("nan")
        if pred is not None and (pred >= 0).all():
            out["bacc_oof"] = M.balanced_accuracy(sd.y, pred, len(sd.classes))
            out["bacc_ci_low"], out["bacc_ci_high"] = M.bootstrap_ci(
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
        boot_groups = sd.groups.astype(str).copy()
        boot_groups[boot_groups == ""] = [f"__item_{i}" for i in np.flatnonzero(boot_groups == "")]
        chance_conf = np.zeros((len(np.unique(boot_groups)), k, k))
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
                row["bacc_ci_low"], row["bacc_ci_high"] = M.bootstrap_confusions(chance_conf, cfg.n_boot, seed=cfg.seed)
            summary.append(row)
        return {"folds": fold_rows, "summary": summary, "fold_majority": fm, "fold_chance": fc,
                "majority_bacc": maj_bacc, "chance_bacc": ch_bacc}

    def _best(self, folds: pd.DataFrame, summary: pd.DataFrame) -> dict:
        probes_only = summary[~summary["probe"].isin(BASELINES)]
        fp = folds[~folds["probe"].isin(BASELINES)]
        out: dict[str, Any] = {"metric": "balanced_accuracy", "cv": self.cfg.cv, "seed": self.cfg.seed,
                               "n_configs": int(len(probes_only))}
        if not len(probes_only):
            return out
        nested = nested_selection(fp)
        top = probes_only.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True]).iloc[0]
        out.update(
            nested_bacc=nested["nested_bacc"], nested_folds=nested["folds"],
            naive_best=_jsonable(top.to_dict()),
            baselines={s: {"majority_bacc": float(g["majority_bacc"].iloc[0]), "chance_bacc": float(g["chance_bacc"].iloc[0])}
                       for s, g in summary.groupby("store", sort=False)},
        )
        if summary["store"].nunique() > 1:
            out["per_store"] = {}
            for s, g in fp.groupby("store", sort=False):
                sub = probes_only[probes_only["store"] == s]
                st = sub.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True]).iloc[0]
                out["per_store"][s] = {"nested_bacc": nested_selection(g)["nested_bacc"],
                                       "naive_best_config": st["config"],
                                       "naive_best_bacc": float(st["balanced_accuracy_mean"])}
        return out

    # -- output ---------------------------------------------------------------------------
    def _write(self, res: SweepResult, datas: list[StoreData]) -> None:
        out = self.cfg.out_dir
        res.folds.to_csv(out / "folds.csv", index=False)
        res.summary.to_csv(out / "summary.csv", index=False)
        res.predictions.to_csv(out / "predictions.csv", index=False)
        pd.concat([d.fold_info for d in datas], ignore_index=True).to_csv(out / "fold_info.csv", index=False)
        (out / "best.json").write_text(json.dumps(res.best, indent=2, default=_json_default) + "\n")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()}
        settings["stores"] = [str(p) for p in self.cfg.stores]
        settings["classes"] = {d.name: d.classes for d in datas}
        (out / "sweep.json").write_text(json.dumps(settings, indent=2, default=_json_default) + "\n")

    def _print(self, res: SweepResult) -> None:
        if self.cfg.quiet:
            return
        from rich.table import Table

        s = res.summary
        probes_only = s[~s["probe"].isin(BASELINES)].sort_values(
            ["balanced_accuracy_mean", "config"], ascending=[False, True]).head(self.cfg.top)
        multi = s["store"].nunique() > 1
        table = Table(title=f"Best configurations (balanced accuracy, {self.cfg.cv}-fold speaker-grouped CV)")
        cols = (["store"] if multi else []) + ["layer", "scope", "pooling", "probe", "weights", "bacc", "95% CI",
                                               "macro-F1", "AUC", "majority", "chance"]
        for c in cols:
            table.add_column(c, justify="right" if c in ("layer", "bacc", "95% CI", "macro-F1", "AUC", "majority", "chance") else "left")
        for _, r in probes_only.iterrows():
            cells = ([r["store"]] if multi else []) + [
                str(r["layer"]), r["scope"], r["pooling"], r["probe"], r["class_weight"],
                f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f}",
                f"{r.get('bacc_ci_low', np.nan):.3f}-{r.get('bacc_ci_high', np.nan):.3f}",
                f"{r['macro_f1_mean']:.3f}", f"{r['roc_auc_ovr_mean']:.3f}",
                f"{r['majority_bacc']:.3f}", f"{r['chance_bacc']:.3f}"]
            table.add_row(*cells)
        self.console.print(table)
        b = res.best
        if "nested_bacc" in b:
            nb = b["naive_best"]
            self.console.print(
                f"headline (nested CV, selection never sees the scored fold): balanced accuracy "
                f"[bold]{b['nested_bacc']:.3f}[/]; naive best {nb['balanced_accuracy_mean']:.3f} ({nb['config']}); "
                + "; ".join(f"{st}: majority {v['majority_bacc']:.3f}, chance {v['chance_bacc']:.3f}"
                            for st, v in b["baselines"].items()), highlight=False)
        self.console.print(f"results in {res.out_dir} ({res.n_fitted} cells fitted, {res.n_cached} reused)", highlight=False)


def _tagged(key: str, fn, *args) -> tuple[str, dict]:
    return key, fn(*args)


def _group_conf_masked(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Per-group confusions counting only ``mask`` items (all groups present, sorted)."""
    names, g = np.unique(groups, return_inverse=True)
    idx = (g[mask] * k + y[mask]) * k + pred[mask]
    return np.bincount(idx, minlength=len(names) * k * k).reshape(len(names), k, k).astype(np.float64)


def _progress(console, enabled: bool, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def nested_selection(folds: pd.DataFrame, metric: str = "balanced_accuracy") -> dict:
    """Honest score of "the best configuration" (``nested_bacc``).

    For each outer fold ``f``: every configuration's mean ``metric`` over the *other* folds is
    computed, the configuration with the highest such mean is chosen (ties, after rounding to 12
    decimals: the smallest config key),
    and that configuration's score *on fold f* is recorded. ``nested_bacc`` is the mean of these
    per-fold scores. The selection for fold ``f`` never sees fold ``f``, so unlike the naive best
    (the maximum over configurations of the mean over all folds) it is not inflated by choosing
    among many configurations. Folds are the sweep's outer folds; a configuration's folds are its
    own store's folds.
    """
    table = folds.pivot_table(index="config", columns="fold", values=metric, aggfunc="first")
    table = table.sort_index()
    per_fold = []
    for f in table.columns:
        others = table.drop(columns=f)
        means = others.mean(axis=1, skipna=True).round(12)  # float noise must not break ties
        means = means[table[f].notna() & means.notna()]
        if not len(means):
            continue
        best = means.index[int(np.argmax(means.to_numpy()))]
        per_fold.append({"fold": int(f), "config": best, "selection_score": float(means[best]),
                         "score": float(table.loc[best, f])})
    nested = float(np.mean([p["score"] for p in per_fold])) if per_fold else float("nan")
    return {"nested_bacc": nested, "folds": per_fold}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, float)):
            v = None if np.isnan(v) else float(v)
        elif isinstance(v, np.integer):
            v = int(v)
        out[k] = v
    return out

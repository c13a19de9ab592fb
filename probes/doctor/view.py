"""The frozen, prepared view of a store that every step reads (built once per run; no step writes it).

* :class:`Table` - the ``items/`` table of every row (what data sanity reads), built by
  :func:`read_table`;
* :class:`View` - the usable items (status ok, labelled, >= 1 frame, finite features), their
  labels, speaker groups and folds (:func:`featstore.cv.make_folds`), the pooled vectors of every
  screened layer (:func:`probes.pooling.pooled_matrix`), the :class:`~probes.doctor.screen.Screen`,
  the check of a stale ``pooled/`` cache, and the optional baseline / padded store
  (:class:`PairedStore`), built by :func:`prepare_view`.

Pooling always reads the frames: a ``pooled/`` cache inside the store is compared with them
(read only), never used, and nothing is written into any store.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from featstore.cv import FoldError, FoldWarning, make_folds
from featstore.layerspec import LayerSpecError, resolve_layers
from featstore.store import OK, Store, open_store
from probes.doctor.result import DoctorError
from probes.doctor.screen import Screen, run_screen
from probes.pooling import item_spans, pooled_matrix, resolve_scope

Fold = tuple[np.ndarray, np.ndarray]


def _frozen(a: Any, copy: bool = True) -> np.ndarray:
    """A read-only array (``copy=False`` for a fresh array nobody else holds)."""
    a = np.array(a, copy=True) if copy else np.asarray(a)
    a.flags.writeable = False
    return a


def _strings(values: Any) -> np.ndarray:
    return np.array(["" if v is None else str(v).strip() for v in values], dtype=object)


def pool_from_frames(store: Store, layer: int, method: str, scope: str, rows: np.ndarray,
                     center_k: int = 1) -> np.ndarray:
    """:func:`probes.pooling.pooled_matrix` over the frames (no cache read, none written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pooled_matrix(store, layer, method, scope=scope, rows=rows,
                             cache=False, center_k=center_k)


# ---------------------------------------------------------------------------------------------
# The items table (data sanity)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """Every row of ``items/`` (strings stripped) plus the run's settings."""

    path: str
    status: np.ndarray
    num_frames: np.ndarray
    num_samples: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    ids: np.ndarray
    sha: np.ndarray
    rms_db: np.ndarray
    extra: Mapping[str, np.ndarray]
    attrs: Mapping[str, Any]
    store_layers: tuple[int, ...]
    layers: tuple[int, ...]
    cv: int
    seed: int

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def ok(self) -> np.ndarray:
        return (self.status == OK) & (self.num_frames > 0)

    @property
    def usable(self) -> np.ndarray:
        """Rows a probe can use: status ok, at least one frame, a label."""
        return self.ok & (self.labels != "")


def read_table(store: Store, layers, cv: int, seed: int) -> Table:
    """The items table and the layers to screen: ``layers`` is a layer spec (``None``/``"all"`` =
    every stored layer; see :func:`featstore.layerspec.resolve_layers`)."""
    have = tuple(store.layer_ids)
    if not have:
        raise DoctorError("the store has no layers")
    try:
        chosen = tuple(resolve_layers(layers, have, what="the store"))
    except LayerSpecError as exc:
        raise DoctorError(str(exc)) from None
    col = store.column
    extra = {c: _frozen(_strings(col(c))) for c in store.extra_columns}
    return Table(
        path=str(store.path), status=_frozen(col("status").astype(str)),
        num_frames=_frozen(col("num_frames").astype(np.int64)),
        num_samples=_frozen(col("num_samples").astype(np.float64)),
        labels=_frozen(_strings(col("label"))), groups=_frozen(_strings(col("group"))),
        ids=_frozen(col("id").astype(str)), sha=_frozen(col("sha256").astype(str)),
        rms_db=_frozen(col("rms_db").astype(np.float64)), extra=MappingProxyType(extra),
        attrs=MappingProxyType(dict(store.attrs)), store_layers=have, layers=chosen, cv=cv, seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# A second store of the same items (baseline, padded)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedStore:
    """Another store of the same items, matched by id.

    ``common``: positions in the view's items that the other store also holds (ok, with frames);
    ``folds``: the view's folds when every item is shared, else folds of the shared items;
    ``pooled``: ``(layer, pooling) -> (len(common), dim)`` vectors of the other store.
    """

    path: str
    name: str
    attrs: Mapping[str, Any]
    common: np.ndarray
    folds: tuple[Fold, ...]
    pooled: Mapping[tuple[int, str], np.ndarray]
    label_mismatches: int
    num_frames: np.ndarray

    @property
    def layers(self) -> list[int]:
        return sorted({k for k, _ in self.pooled})


def check_paired(path: Path, what: str) -> None:
    """Refuse a baseline / padded store that cannot serve, before any work is done."""
    try:
        other = open_store(path)
    except (OSError, ValueError) as exc:
        raise DoctorError(f"{what}: {exc}") from None
    with other:
        if what == "padded" and bool(other.attrs.get("padding_exact", False)):
            raise DoctorError(f"--padded: {path} is padding-exact (padding_exact=true), not the output of a "
                              "padded pipeline; give a store written by the common recipe "
                              "(featstore extract --emulate-padding SECONDS)")


def _paired(view: "View", path: Path, what: str, poolings: Mapping[str, tuple[str, str]],
            layers: Sequence[int] | None) -> PairedStore:
    """Open ``path``, match its items to the view's by id and pool ``layers`` (None = all).

    ``poolings``: output name -> (method, scope) where scope ``auto`` means the view's scope when
    the other store allows it, else the clip.
    """
    check_paired(path, what)
    with open_store(path) as other:
        name = str(other.attrs.get("encoder", "") or Path(path).stem)
        status = other.column("status").astype(str)
        nfr = other.column("num_frames").astype(np.int64)
        ok = (status == OK) & (nfr > 0)
        oid = other.column("id").astype(str)
        pos = {i: r for r, i in enumerate(oid) if ok[r]}
        common = np.array([j for j, i in enumerate(view.ids) if i in pos], dtype=np.int64)
        if len(common) < max(10, len(view.ids) // 2):
            raise DoctorError(f"the {what} store {path} shares only {len(common)} of {len(view.ids)} item ids "
                              f"with the store; give a {what} store extracted from the same manifest")
        orows = np.array([pos[i] for i in view.ids[common]], dtype=np.int64)
        olabels = _strings(other.column("label"))[orows]
        mismatches = int((olabels != view.labels[common]).sum())
        scope = view.scope
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                item_spans(other, resolve_scope(other, scope))
        except ValueError:
            scope = "clip"
        have = other.layer_ids
        if layers is None:
            use = have
        else:
            missing = [k for k in layers if k not in have]
            if missing:
                raise DoctorError(f"the {what} store {path} has no layer {','.join(map(str, missing))} "
                                  f"(it has {', '.join(map(str, have))})")
            use = list(layers)
        pooled = {}
        for layer in use:
            for out_name, (method, sc) in poolings.items():
                pooled[(layer, out_name)] = _frozen(pool_from_frames(other, layer, method,
                                                                     scope if sc == "auto" else sc, orows),
                                                    copy=False)
        attrs = MappingProxyType(dict(other.attrs))
        frames = _frozen(nfr[orows])
    if len(common) == len(view.ids):
        folds = view.folds
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folds = tuple(make_folds(view.labels[common], view.groups[common], view.cv, view.seed))
    return PairedStore(str(path), name, attrs, _frozen(common), folds, MappingProxyType(pooled), mismatches, frames)


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """The usable items of a store and everything the steps after data sanity read.

    Arrays are read-only; mappings are read-only proxies. ``pooled`` holds, per screened layer,
    ``stats`` (mean and std over the scope's frames; ``mean`` is its first half) and ``clip-mean``
    when the scope is the segment; ``edge_spread[layer]`` is the mean over dimensions of the spread
    across items of the first and of the last frame (NaN-aware). ``fatal`` names why the later steps cannot run (then ``folds``
    and ``screen`` are None).
    """

    table: Table
    rows: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    num_samples: np.ndarray
    num_frames: np.ndarray
    rms_db: np.ndarray
    sha: np.ndarray
    extra: Mapping[str, np.ndarray]
    layers: tuple[int, ...]
    scope: str
    pooled: Mapping[tuple[int, str], np.ndarray]
    edge_spread: Mapping[int, tuple[float, float]]
    constant_share: Mapping[int, float]
    nonfinite: int
    nonfinite_per_layer: Mapping[int, int]
    cache_check: Mapping[str, float]
    folds: tuple[Fold, ...] | None
    fold_warnings: tuple[str, ...]
    fatal: str | None
    notes: tuple[str, ...]
    n_perm: int
    cv: int
    seed: int
    screen: Screen | None = None
    baseline: PairedStore | None = None
    padded: PairedStore | None = None

    @property
    def k(self) -> int:
        return len(self.classes)

    @property
    def chance(self) -> float:
        return 1.0 / self.k

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self.table.attrs

    @property
    def has_groups(self) -> bool:
        return bool((self.groups != "").any())

    @property
    def duration(self) -> np.ndarray:
        """Log clip duration (samples; frames where samples are unknown)."""
        ns = self.num_samples
        if np.isfinite(ns).all() and (ns > 0).all():
            return np.log(ns)
        return np.log(np.maximum(self.num_frames, 1).astype(np.float64))

    def X(self, layer: int, pooling: str) -> np.ndarray:
        """Pooled vectors of one layer: ``mean``/``stats`` over the scope, ``clip-mean`` over the clip."""
        if pooling == "clip-mean":
            return self.pooled[(layer, "clip-mean")] if self.scope != "clip" else self.X(layer, "mean")
        stats = self.pooled[(layer, "stats")]
        return stats if pooling == "stats" else stats[:, : stats.shape[1] // 2]


def _cache_check(store: Store, rows: np.ndarray, layers: Sequence[int]) -> tuple[dict[str, float], list[str]]:
    """Relative max difference between each ``pooled/<key>/NN`` of the screened layers and the same
    pooling of the frames (inf when the shapes differ); notes for keys that cannot be checked."""
    if "pooled" not in store.h5:
        return {}, []
    out, notes = {}, []
    for key in sorted(store.h5["pooled"].keys()):
        scope, _, method = key.partition("-")
        k = 1
        if method.startswith("center") and method[6:].isdigit():
            method, k = "center", int(method[6:])
        for layer in layers:
            cached = store.pooled(key, layer)
            if cached is None:
                continue
            try:
                ref = pool_from_frames(store, layer, method, scope, rows, center_k=k)
            except ValueError as exc:
                notes.append(f"pooled/{key} not checked: {exc}")
                break
            name = f"{key}/{layer:02d}"
            if cached.shape[0] != store.num_items or cached.shape[1] != ref.shape[1]:
                out[name] = float("inf")
                continue
            diff = np.abs(cached[rows].astype(np.float64) - ref)
            scale = float(np.nanmax(np.abs(ref))) if ref.size else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = float(np.nanmax(diff) / (scale or 1.0)) if diff.size else 0.0
    return out, notes


def prepare_view(store: Store, table: Table, n_perm: int, baseline: Path | None = None,
                 padded: Path | None = None, log: Callable[[str], None] = lambda m: None) -> View:
    """Pool every screened layer of the usable items, drop items with NaN/inf features, build the
    folds, screen, and attach the baseline / padded store. Called once data sanity passed."""
    notes: list[str] = []
    rows = np.flatnonzero(table.usable)
    try:
        scope = resolve_scope(store, "auto")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            item_spans(store, scope)
        notes += [str(w.message) for w in caught]
    except ValueError as exc:
        notes.append(f"segment pooling unavailable ({exc}); pooling over whole clips")
        scope = "clip"
    log("pooling layers " + ",".join(map(str, table.layers)))
    pooled, edge, finite = {}, {}, np.ones(len(rows), dtype=bool)
    bad_layers: dict[int, int] = {}
    for layer in table.layers:
        stats = pool_from_frames(store, layer, "stats", scope, rows)
        pooled[(layer, "stats")] = stats
        clip_mean = stats[:, : stats.shape[1] // 2]
        if scope != "clip":
            clip_mean = pool_from_frames(store, layer, "mean", "clip", rows)
            pooled[(layer, "clip-mean")] = clip_mean
        ok = np.isfinite(stats).all(axis=1) & np.isfinite(clip_mean).all(axis=1)
        if (~ok).any():
            bad_layers[layer] = int((~ok).sum())
        finite &= ok
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an all-NaN column: its spread is NaN
            edge[layer] = tuple(float(np.nanmean(np.nanstd(pool_from_frames(store, layer, end, "clip", rows)
                                                          .astype(np.float64), axis=0)))
                                for end in ("first", "last"))
    cache_check, cache_notes = _cache_check(store, rows, table.layers)
    notes += cache_notes
    n_bad = int((~finite).sum())
    keep = np.flatnonzero(finite)
    if n_bad:
        notes.append(f"{n_bad} items with NaN/inf features left out of the later steps")
    pooled = {key: _frozen(v[keep], copy=False) for key, v in pooled.items()}
    constant = {}
    for layer in table.layers:
        cm = (pooled[(layer, "clip-mean")] if scope != "clip" else
              pooled[(layer, "stats")][:, : pooled[(layer, "stats")].shape[1] // 2])
        sd = cm.std(axis=0)
        constant[layer] = float(np.mean(sd <= 1e-7 * (1 + np.abs(cm).mean(axis=0))))
    rows = rows[keep]
    labels = table.labels[rows]
    classes = tuple(sorted(set(labels.tolist())))
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in labels], dtype=np.int64)
    folds, fold_warnings, fatal = None, [], None
    if len(classes) < 2:
        fatal = "too few usable items after removing NaN/inf features"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                folds = tuple(make_folds(labels, table.groups[rows], table.cv, table.seed))
            except FoldError as exc:
                fatal = str(exc)
                notes.append(str(exc))
        fold_warnings = [str(w.message) for w in caught if issubclass(w.category, FoldWarning)]
    view = View(
        table=table, rows=_frozen(rows), ids=_frozen(table.ids[rows]), labels=_frozen(labels),
        groups=_frozen(table.groups[rows]), y=_frozen(y), classes=classes,
        num_samples=_frozen(table.num_samples[rows]), num_frames=_frozen(table.num_frames[rows]),
        rms_db=_frozen(table.rms_db[rows]), sha=_frozen(table.sha[rows]),
        extra=MappingProxyType({c: _frozen(v[rows]) for c, v in table.extra.items()}),
        layers=table.layers, scope=scope, pooled=MappingProxyType(pooled),
        edge_spread=MappingProxyType(edge), constant_share=MappingProxyType(constant),
        nonfinite=n_bad, nonfinite_per_layer=MappingProxyType(bad_layers),
        cache_check=MappingProxyType(cache_check), folds=folds, fold_warnings=tuple(fold_warnings),
        fatal=fatal, notes=tuple(notes), n_perm=n_perm, cv=table.cv, seed=table.seed,
    )
    if fatal:
        return view
    log("screening layers x poolings (with label shuffles)")
    view = replace(view, screen=run_screen(view))
    extra: dict[str, Any] = {}
    if baseline is not None:
        log("pooling the baseline store")
        extra["baseline"] = _paired(view, baseline, "baseline", {"stats": ("stats", "auto")}, None)
    if padded is not None:
        log("pooling the padded store")
        extra["padded"] = _paired(view, padded, "padded", {"clip-mean": ("mean", "clip")},
                                  [view.screen.best[0]])
    return replace(view, **extra) if extra else view

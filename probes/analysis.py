"""Layer-wise analysis of a store: SVCCA / PWCCA / linear CKA per layer against the label and
nuisance columns (the speaker, sex, ...), layer-to-layer and store-to-store similarity.

For each layer, the items' representations (pooled per item, the centre frame of each item or
segment, or every frame) are compared with a one-hot encoding of each target column
(:mod:`probes.similarity`):

* ``svcca`` / ``pwcca`` are *held out*: the layer is SVD-reduced once (unsupervised, all rows),
  CCA is fitted on training folds and the canonical correlations are measured on the held-out fold.
  Folds keep a speaker's items together; for a target that identifies the speaker (``group``, or
  any column whose every class belongs to one speaker) each speaker's items are spread over the
  folds instead, since unseen speakers cannot be predicted.
* ``cka`` is linear CKA with the full one-hot encoding, in sample (it has no fitted directions);
  its floor is read from the shuffled control.

Controls: every score comes with a 95 % bootstrap interval over speakers (speakers are resampled
with replacement, :mod:`probes.bootstrap`, and every fold's CCA is refitted on the resampled
training speakers; the percentile interval is shifted so that its median is the estimate,
:func:`probes.bootstrap.centred_interval`), and a
``shuffled=True`` row: the same score with the target permuted (across speakers when the target is
constant within speakers, else across items), its mean and 2.5-97.5 % range over the permutations.

Outputs of :func:`run_analysis`: ``profile.csv``, ``similarity_<a>_<b>.csv``, ``profile_<store>.png``,
``similarity_<a>_<b>_<method>.png`` (drawn by :mod:`probes.plots`), ``analysis.md`` and the same
report as one self-contained page, ``report.html``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from featstore.cv import cca_folds
from featstore.layerspec import LayerSpec, LayerSpecError, resolve_layers
from featstore.store import OK, Store, open_store
from probes import plots, tables
from probes.bootstrap import centred_interval, speaker_codes, speaker_draws
from probes.html import write_html
from probes.names import ANALYSIS_LEVELS as LEVELS
from probes.names import ANALYSIS_METHODS as METHODS
from probes.names import POOLINGS, SCOPES
from probes.pooling import item_spans, pooled_matrix, resolve_scope
from probes.provenance import provenance_table, store_provenance
from probes.similarity import HeldOutCCA, OneHotCKA, center, linear_cka, svd_reduce
PROFILE_COLUMNS = ["store", "layer", "method", "target", "score", "ci_low", "ci_high", "shuffled",
                   "n_items", "n_rows", "n_speakers", "dims", "level", "pooling", "scope"]
PathLike = str | os.PathLike
#: SVD variance kept, folds and fold assignments of held-out CCA (defaults of every entry point)
KEEP, N_SPLITS, N_REPEATS = 0.99, 5, 5


class AnalysisError(ValueError):
    """A user mistake (missing column, no common items, bad option): one clear message."""


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Reading representations
# ---------------------------------------------------------------------------------------------
def _open(path: PathLike) -> Store:
    try:
        return open_store(path)
    except (OSError, ValueError) as exc:
        raise AnalysisError(str(exc)) from None


def _check_options(level: str, pooling: str, scope: str, methods: Sequence[str] = ()) -> None:
    if level not in LEVELS:
        raise AnalysisError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    if level == "pooled" and pooling not in POOLINGS:
        raise AnalysisError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if scope not in SCOPES:
        raise AnalysisError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AnalysisError(f"unknown method {', '.join(bad) or '(none)'}; use svcca, pwcca and/or cka")


def _layers(store: Store, layers) -> list[int]:
    """The stored layers a spec names (``None``/``"all"``: every stored layer; a store extracted
    with ``--layers 0,4,8`` holds layers 0, 4 and 8, and ``-1`` is its last one)."""
    if layers is not None and not isinstance(layers, (str, int, LayerSpec)):
        layers = list(layers)
        if not layers:
            raise AnalysisError("no layers selected")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in layers):
            raise AnalysisError(f"layers must be integers, got {layers!r}")
    try:
        return resolve_layers(layers, store.layer_ids, what=store.path.name)
    except LayerSpecError as exc:
        raise AnalysisError(str(exc)) from None


@dataclass
class _Sample:
    """Which rows a representation has: items (store rows) and, below item level, frames."""

    items: np.ndarray  # (m,) store rows of the selected items
    row_item: np.ndarray  # (n,) index into ``items`` of each representation row
    frames: np.ndarray | None  # (n,) absolute frame index per row (None when pooled)
    rel: np.ndarray | None  # (n,) frame position inside its item's span
    scope: str
    notes: list[str] = field(default_factory=list)
    lengths: np.ndarray | None = None  # (m,) span lengths in frames (below item level)
    level: str = "pooled"


def _spans(store: Store, scope: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spans = item_spans(store, scope)
        except ValueError as exc:
            raise AnalysisError(f"{store.path.name}: {exc}") from None
    notes += [str(w.message) for w in caught]
    return spans


def _sample(store: Store, items: np.ndarray, level: str, scope: str, max_rows: int,
            rng: np.random.Generator) -> _Sample:
    real = resolve_scope(store, scope)
    notes: list[str] = []
    start, stop = _spans(store, real, notes)
    if level in ("pooled", "center"):  # the centre frame is the "center" pooling (probes.pooling)
        return _Sample(items, np.arange(len(items)), None, None, real, notes, level=level)
    s, e = start[items], stop[items]
    lengths = e - s
    row_item = np.repeat(np.arange(len(items)), lengths)
    bounds = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rel = np.arange(int(lengths.sum())) - np.repeat(bounds, lengths)
    if len(rel) > max_rows:
        keep = np.sort(rng.choice(len(rel), size=max_rows, replace=False))
        notes.append(f"{max_rows} of {len(rel)} frames drawn at random")
        row_item, rel = row_item[keep], rel[keep]
    return _Sample(items, row_item, s[row_item] + rel, rel, real, notes, lengths, level="frames")


def _matrix(store: Store, layer: int, sample: _Sample, pooling: str) -> np.ndarray:
    """The representation of one layer, ``(rows, dim)`` float64: pooled vectors (the one pooling
    implementation), or the sampled frames read in offset-sorted chunks (never the whole layer)."""
    if sample.frames is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            X = pooled_matrix(store, layer, "center" if sample.level == "center" else pooling, sample.scope,
                              rows=sample.items)
        return np.asarray(X, dtype=np.float64)
    return store.read_frames(layer, sample.frames, dtype=np.float64)


def _usable(store: Store, columns: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Rows with status ok, frames, and a non-empty value in every column; plus a note."""
    have = set(store.h5["items"].keys())
    missing = [c for c in columns if c not in have]
    if missing:
        extra = store.extra_columns
        raise AnalysisError(
            f"{store.path.name} has no items/ column {', '.join(map(repr, missing))}; usable columns: "
            f"label, group{''.join(', ' + c for c in extra)}"
        )
    status = store.column("status")
    ok = (status == OK) & (store.column("num_frames") > 0)
    reasons = [f"{int((~ok).sum())} not ok"] if (~ok).any() else []
    use = ok.copy()
    for col in columns:
        if col == "group":
            continue  # an item without a speaker becomes its own speaker
        empty = ok & (np.asarray([str(v) for v in store.column(col)], dtype=object) == "")
        if empty.any():
            reasons.append(f"{int(empty.sum())} with empty {col}")
        use &= ~empty
    n = store.num_items
    note = f"{store.path.name}: using {int(use.sum())} of {n} items" + (f" ({', '.join(reasons)})" if reasons else "")
    if not use.any():
        raise AnalysisError(note + "; nothing to analyse")
    return np.flatnonzero(use), [note]


def _speakers(store: Store, items: np.ndarray) -> tuple[np.ndarray, list[str]]:
    g = np.asarray([str(v) for v in store.column("group")[items]], dtype=object)
    notes = []
    if (g == "").any():
        notes.append(f"{int((g == '').sum())} items have no speaker (group) and count as their own speaker")
    codes, _ = speaker_codes(g)
    return codes, notes


# ---------------------------------------------------------------------------------------------
# Per-layer profile
# ---------------------------------------------------------------------------------------------
@dataclass
class _Target:
    name: str
    codes: np.ndarray  # class code per representation row
    within: bool  # folds split inside speakers (the target identifies the speaker)
    folds: np.ndarray  # (repeats, rows) fold assignments of the estimate
    boot_folds: np.ndarray  # (n_boot, rows) a fresh assignment per bootstrap draw
    shuffles: list[np.ndarray]  # permuted codes
    shuffle_folds: np.ndarray  # (n_shuffle, rows)


def _target(name: str, values: np.ndarray, spk: np.ndarray, unit: np.ndarray, n_splits: int, n_repeats: int,
            n_boot: int, n_shuffle: int, seed: int, rng: np.random.Generator) -> _Target | str:
    classes, codes = np.unique(values.astype(str), return_inverse=True)
    if len(classes) < 2:
        return f"{name}: only one value ({classes[0]!r}) among the used items; skipped"
    pairs = np.unique(np.stack([codes, spk]), axis=1)
    speakers_per_class = np.bincount(pairs[0], minlength=len(classes))
    within = bool((speakers_per_class == 1).all())
    const_in_speaker = pairs.shape[1] == len(np.unique(spk))

    def folds(count: int, offset: int) -> np.ndarray:
        return np.stack([cca_folds(spk, n_splits, seed + offset + r, within=within, units=unit)
                         for r in range(count)]) if count else np.zeros((0, len(spk)), dtype=np.int64)

    try:
        point = folds(n_repeats, 0)
    except ValueError as exc:
        return f"{name}: {exc}; skipped"
    shuffles = []
    for _ in range(n_shuffle):
        if const_in_speaker and not within:
            value_of = np.zeros(int(spk.max()) + 1, dtype=np.int64)
            value_of[spk] = codes
            shuffles.append(rng.permutation(value_of)[spk])
        else:
            _, first = np.unique(unit, return_index=True)
            value_of = np.zeros(int(unit.max()) + 1, dtype=np.int64)
            value_of[unit[first]] = codes[first]
            shuffles.append(rng.permutation(value_of)[unit])
    return _Target(name, codes.astype(np.int64), within, point, folds(n_boot, 10_000),
                   shuffles, folds(n_shuffle, 20_000))


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise AnalysisError("no store given")
    return out


def store_names(paths: Sequence[PathLike]) -> list[str]:
    """Short, unique names of stores (file stems; an index is added to repeated stems)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def layer_profile(
    store_paths: PathLike | Sequence[PathLike],
    target: str = "label",
    nuisances: Sequence[str] = ("group",),
    methods: Sequence[str] = METHODS,
    level: str = "pooled",
    pooling: str = "mean",
    scope: str = "auto",
    layers: Iterable[int] | None = None,
    n_boot: int = 200,
    n_shuffle: int = 20,
    n_splits: int = N_SPLITS,
    n_repeats: int = N_REPEATS,
    keep: float = KEEP,
    max_dims: int | None = None,
    max_rows: int = 5000,
    seed: int = 0,
    n_jobs: int = 1,
    log: Log | None = None,
) -> pd.DataFrame:
    """Score of every layer against ``target`` and each nuisance column, with controls.

    Returns a tidy DataFrame (:data:`PROFILE_COLUMNS`): one row per (store, layer, method,
    target, shuffled); ``dims`` is the SVD-reduced dimension used by CCA (``keep`` of the variance,
    at most ``max_dims``); held-out scores are averaged over ``n_repeats`` random assignments to
    ``n_splits`` folds, and each bootstrap draw uses a fresh assignment. ``level`` = ``pooled``
    (``pooling`` over the item's span), ``center`` (the span's centre frame) or ``frames`` (every
    frame of the span, at most ``max_rows`` drawn at random). Items whose status is not ok or with
    an empty target are skipped; ``log`` receives one line per store saying how many. Layers are
    scored in ``n_jobs`` processes (joblib; -1 = all cores).
    """
    log = log or _quiet
    methods = tuple(methods)
    _check_options(level, pooling, scope, methods)
    if n_boot < 0 or n_shuffle < 0 or n_repeats < 1 or n_splits < 2:
        raise AnalysisError("need n_boot >= 0, n_shuffle >= 0, n_repeats >= 1 and n_splits >= 2")
    columns = list(dict.fromkeys([target, *nuisances]))
    names = store_names(_as_paths(store_paths))
    records: list[dict] = []
    notes_all: dict[str, list[str]] = {}
    for name, path in zip(names, _as_paths(store_paths)):
        rng = np.random.default_rng(seed)
        with _open(path) as store:
            ks = _layers(store, layers)
            items, notes = _usable(store, columns)
            sample = _sample(store, items, level, scope, max_rows, rng)
            spk_item, spk_notes = _speakers(store, items)
            notes += sample.notes + spk_notes
            spk = spk_item[sample.row_item]
            unit = sample.row_item
            n_spk = int(spk.max()) + 1
            targets: list[_Target] = []
            for col in columns:
                if col == "group":  # the speakers as used for folds and bootstrap (empty -> own speaker)
                    values = spk.astype(str).astype(object)
                else:
                    values = np.asarray([str(v) for v in store.column(col)[items]], dtype=object)[sample.row_item]
                t = _target(col, values, spk, unit, n_splits, n_repeats, n_boot, n_shuffle, seed, rng)
                if isinstance(t, str):
                    notes.append(t)
                else:
                    targets.append(t)
            for note in notes:
                log(note)
            notes_all[name] = notes
            if not targets:
                continue
            M = speaker_draws(n_spk, n_boot, rng) if n_boot else np.zeros((0, n_spk))
            Wrows = M[:, spk]
            base = dict(store=name, n_items=len(items), n_rows=len(spk), n_speakers=n_spk, level=level,
                        pooling=pooling if level == "pooled" else "", scope=sample.scope)
            jobs = (delayed(_layer_rows)(_matrix(store, k, sample, pooling), k, targets, methods, spk, M, Wrows,
                                         keep, max_dims, base) for k in ks)
            for rows in Parallel(n_jobs=n_jobs)(jobs):
                records += rows
    df = pd.DataFrame.from_records(records, columns=PROFILE_COLUMNS)
    df.attrs["notes"] = notes_all
    return df


def _layer_rows(*args) -> list[dict]:
    """Rows of one layer; BLAS on one thread (small matrices; parallelism is across layers)."""
    with threadpool_limits(1):
        return _score_layer(*args)


def _score_layer(X: np.ndarray, k: int, targets: list[_Target], methods: tuple[str, ...], spk: np.ndarray,
                 M: np.ndarray, Wrows: np.ndarray, keep: float, max_dims: int | None, base: dict) -> list[dict]:
    out = []
    Xc = center(X)
    cca_methods = [m for m in methods if m in ("svcca", "pwcca")]
    Z, dims = None, 0
    if cca_methods:
        try:
            red = svd_reduce(Xc, keep, max_dims)
            Z, dims = red.scores, red.dims
        except ValueError:  # a constant layer: every score is NaN
            Z = None
    cka = OneHotCKA(Xc, spk) if "cka" in methods else None
    if Z is not None:
        pw = "pwcca" in cca_methods
        base_ho = HeldOutCCA(Z, targets[0].codes, neurons=Xc if pw else None, pw=pw, groups=spk)

    def add(method: str, target: str, point: float, boots: np.ndarray, shuffled: list[float]) -> None:
        lo, hi = centred_interval(boots, point, (0.0, 1.0) if method == "cka" else (-1.0, 1.0))
        out.append(dict(base, layer=k, method=method, target=target, score=float(point), ci_low=lo,
                        ci_high=hi, shuffled=False, dims=dims))
        sh = np.asarray(shuffled, dtype=np.float64)
        if len(sh):
            lo, hi = centred_interval(sh)
            mean = float(np.nanmean(sh)) if np.isfinite(sh).any() else float("nan")
            out.append(dict(base, layer=k, method=method, target=target, score=mean, ci_low=lo, ci_high=hi,
                            shuffled=True, dims=dims))

    nan = float("nan")
    for t in targets:
        if cca_methods:
            if Z is None:
                for m in cca_methods:
                    add(m, t.name, nan, np.full(len(M), nan), [nan] * len(t.shuffles))
            else:
                ho = base_ho.with_target(t.codes)
                boots = ho.scores(t.boot_folds, Wrows) if len(M) else {}
                shuffled = [ho.with_target(c).run(f) for c, f in zip(t.shuffles, t.shuffle_folds)]
                for m in cca_methods:
                    add(m, t.name, ho.score(t.folds, m), boots.get(m, np.zeros(0)), [r[m] for r in shuffled])
        if cka is not None:
            boots = cka.scores(t.codes, M) if len(M) else np.zeros(0)
            add("cka", t.name, cka.scores(t.codes)[0], boots, [cka.scores(c)[0] for c in t.shuffles])
    return out


def find_crossover(profile: pd.DataFrame, store: str, method: str, target: str = "label",
                   speaker: str = "group") -> int | None:
    """First layer where the target's curve rises above the speaker's while the target score goes
    up and the speaker score goes down (from the previous layer); ``None`` when there is none."""
    d = profile[(profile.store == store) & (profile.method == method) & ~profile.shuffled]
    t = d[d.target == target].set_index("layer").score.sort_index()
    s = d[d.target == speaker].set_index("layer").score.sort_index()
    layers = t.index.intersection(s.index)
    t, s = t[layers].to_numpy(), s[layers].to_numpy()
    for i in range(1, len(layers)):
        if t[i - 1] < s[i - 1] and t[i] >= s[i] and t[i] > t[i - 1] and s[i] < s[i - 1]:
            return int(layers[i])
    return None


# ---------------------------------------------------------------------------------------------
# Layer-to-layer and store-to-store similarity
# ---------------------------------------------------------------------------------------------
def _common_items(a: Store, b: Store) -> tuple[np.ndarray, np.ndarray, str]:
    def ok_ids(s: Store) -> dict[str, int]:
        use = (s.column("status") == OK) & (s.column("num_frames") > 0)
        return {str(i): int(r) for i, r in zip(s.column("id")[use], np.flatnonzero(use))}

    ia, ib = ok_ids(a), ok_ids(b)
    common = [i for i in ia if i in ib]
    if not common:
        raise AnalysisError(
            f"{a.path.name} and {b.path.name} have no items in common (matched by id among items with status ok)"
        )
    note = f"{a.path.name} vs {b.path.name}: {len(common)} common items ({len(ia)} and {len(ib)} usable)"
    return np.array([ia[i] for i in common]), np.array([ib[i] for i in common]), note


def _sample_like(store: Store, items: np.ndarray, ref: _Sample, level: str, scope: str) -> _Sample:
    real = resolve_scope(store, scope)
    notes: list[str] = []
    start, stop = _spans(store, real, notes)
    if level in ("pooled", "center"):
        return _Sample(items, ref.row_item, None, None, real, notes, level=level)
    s, e = start[items], stop[items]
    if not np.array_equal(e - s, ref.lengths):
        raise AnalysisError(
            f"{store.path.name}: frame-level similarity needs the same frames per item in both stores; "
            "use --level pooled or center"
        )
    return _Sample(items, ref.row_item, s[ref.row_item] + ref.rel, ref.rel, real, notes, level="frames")


def _cka_matrix(A: list[np.ndarray], B: list[np.ndarray] | None) -> np.ndarray:
    n = A[0].shape[0]
    same = B is None
    B = A if same else B
    if n * n * 8 * (len(A) + (0 if same else len(B))) <= 1 << 30:  # Gram form, < 1 GiB
        def grams(mats: list[np.ndarray]) -> np.ndarray:
            out = np.empty((len(mats), n * n))
            for i, X in enumerate(mats):
                K = (X @ X.T).ravel()
                norm = np.linalg.norm(K)
                out[i] = K / norm if norm > 0 else np.nan
            return out

        ga = grams(A)
        gb = ga if same else grams(B)
        return np.clip(ga @ gb.T, 0.0, 1.0)
    return np.array([[linear_cka(x, y) for y in B] for x in A])


def layer_similarity(
    store_a: PathLike,
    store_b: PathLike | None = None,
    method: str = "cka",
    level: str = "pooled",
    pooling: str = "mean",
    scope: str = "auto",
    layers_a: Iterable[int] | None = None,
    layers_b: Iterable[int] | None = None,
    n_splits: int = N_SPLITS,
    keep: float = KEEP,
    max_dims: int | None = None,
    max_rows: int = 5000,
    seed: int = 0,
    log: Log | None = None,
) -> np.ndarray:
    """``(La, Lb)`` similarity of every layer of ``store_a`` with every layer of ``store_b``
    (default: ``store_a`` itself) over the items both hold (matched by id, status ok).

    ``cka``: linear CKA. ``svcca`` / ``pwcca``: held out (folds grouped by speaker), each layer
    SVD-reduced once; PWCCA is weighted on ``store_a``'s neurons.
    """
    log = log or _quiet
    _check_options(level, pooling, scope, (method,))
    rng = np.random.default_rng(seed)
    with _open(store_a) as a:
        b = _open(store_b) if store_b is not None else None
        try:
            if b is None:
                items_a, _ = _usable(a, [])
                items_b = items_a
            else:
                items_a, items_b, note = _common_items(a, b)
                log(note)
            sa = _sample(a, items_a, level, scope, max_rows, rng)
            sb = sa if b is None else _sample_like(b, items_b, sa, level, scope)
            ka = _layers(a, layers_a)
            kb = _layers(b if b is not None else a, layers_b)
            A = [center(_matrix(a, k, sa, pooling)) for k in ka]
            B = None if b is None and list(kb) == list(ka) else [center(_matrix(b or a, k, sb, pooling)) for k in kb]
            spk, _ = _speakers(a, items_a)
            spk = spk[sa.row_item]
        finally:
            if b is not None:
                b.close()
    if method == "cka":
        return _cka_matrix(A, B)
    B = A if B is None else B
    folds = cca_folds(spk, n_splits, seed) if len(np.unique(spk)) >= 2 else cca_folds(sa.row_item, n_splits, seed)

    def reduce(X: np.ndarray) -> np.ndarray | None:
        try:
            return svd_reduce(X, keep, max_dims).scores
        except ValueError:
            return None

    out = np.full((len(A), len(B)), np.nan)
    with threadpool_limits(1):  # small matrices: threads only add overhead
        za, zb = [reduce(X) for X in A], [reduce(X) for X in B]
        for i, (x, X) in enumerate(zip(za, A)):
            if x is None:
                continue
            base = HeldOutCCA(x, x, neurons=X, pw=method == "pwcca")  # PWCCA moments shared by the row
            for j, y in enumerate(zb):
                if y is not None:
                    out[i, j] = base.with_target(y).score(folds, method)
    return out


# ---------------------------------------------------------------------------------------------
# The report (figures: probes.plots)
# ---------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def method_notes(options: dict) -> list[str]:
    """The analysis choices that differ from the published methods, named with their values."""
    n_boot, n_shuffle = options.get("n_boot", 0), options.get("n_shuffle", 0)
    cap = options.get("max_dims")
    cap_text = f"at most {cap} dimensions" if cap not in (None, "auto") else "at most min(50, n/10) dimensions (n = rows)"
    return [
        f"**SVCCA dimension cap**: each layer is SVD-reduced to the fewest components holding "
        f"{100 * float(options.get('keep', 0.99)):g} % of its variance, and {cap_text} (the `dims` column of "
        "`profile.csv` gives the number used). Raghu et al. (2017) keep 99 % without a cap; the cap keeps "
        "the CCA dimension far below the number of rows, where in-sample CCA reports ~1 even for shuffled labels.",
        f"**Held-out CCA**: SVCCA and PWCCA directions are fitted on training folds and the canonical "
        f"correlations measured on held-out rows ({options.get('n_splits', 5)} folds that keep a speaker's "
        "items together, or spread each speaker's items over the folds when the target identifies the speaker; "
        f"averaged over {options.get('n_repeats', 5)} fold assignments). The published SVCCA and PWCCA are "
        "in-sample.",
        "**PWCCA weighting side**: the canonical correlations are weighted by how much of the *layer's* "
        "neurons each canonical variate accounts for (on the training rows), never the target's; in "
        "layer-to-layer similarity, by the first store's (the row's) layer. Morcos et al. (2018) weight by "
        "the first argument, so the side is fixed here rather than symmetric.",
        "**CKA**: linear CKA with the biased HSIC estimator (Kornblith et al. 2019), in sample, against the "
        "full one-hot encoding of the target; its floor is read from the shuffled control.",
        f"**Interval method**: a 95 % speaker bootstrap ({n_boot} draws; speakers resampled with replacement, "
        "CCA refitted on each draw's rows) whose percentile interval is shifted so that its median equals "
        "the estimate (resampled speakers bias refitted held-out CCA down and CKA up) — not a plain "
        "percentile interval.",
        f"**Shuffled floor**: the same score with the target permuted across speakers when it is constant "
        f"within speakers, else across items; mean and 2.5-97.5 % range over {n_shuffle} permutations.",
    ]


def _best_rows(profile: pd.DataFrame, store: str) -> list[dict]:
    """Per (method, target) of one store: the best layer, its score and interval, and the
    shuffled floor at that layer."""
    d = profile[profile.store == store]
    out = []
    for (method, t), e in d[~d.shuffled].groupby(["method", "target"], sort=False):
        if not e.score.notna().any():
            continue
        best = e.loc[e.score.idxmax()]
        floor = d[d.shuffled & (d.method == method) & (d.target == t) & (d.layer == best.layer)]
        out.append({"method": method, "target": t, "layer": int(best.layer), "score": best.score,
                    "ci_low": best.ci_low, "ci_high": best.ci_high, "n_layers": int(e.layer.nunique()),
                    "floor": floor.score.iloc[0] if len(floor) else float("nan"),
                    "floor_high": floor.ci_high.iloc[0] if len(floor) else float("nan")})
    return out


def crossovers(profile: pd.DataFrame, store: str, target: str, speaker: str = "group") -> dict[str, int | None]:
    """``{method: crossover layer or None}`` of one store (empty without both curves)."""
    d = profile[profile.store == store]
    if speaker not in set(d.target) or target not in set(d.target) or target == speaker:
        return {}
    return {m: find_crossover(profile, store, m, target, speaker) for m in dict.fromkeys(d.method)}


def _headline(profile: pd.DataFrame, labels: dict[str, str], target: str) -> list[str]:
    lines = []
    for store in dict.fromkeys(profile.store):
        rows = [r for r in _best_rows(profile, store) if r["target"] == target]
        if not rows:
            continue
        parts = []
        for r in rows:
            above = "above" if r["ci_low"] > r["floor_high"] else "not clearly above"
            parts.append(f"{r['method']} {_fmt(r['score'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] at layer "
                         f"{r['layer']} (shuffled floor {_fmt(r['floor'])}, 97.5 % {_fmt(r['floor_high'])}: {above})")
        lines.append(f"- **{labels.get(store, store)}**, target `{target}`: " + "; ".join(parts) + ".")
    if lines:
        n = max(r["n_layers"] for s in dict.fromkeys(profile.store) for r in _best_rows(profile, s))
        lines += ["", f"What these numbers are: the best of {n} layer{'s' if n != 1 else ''} by its own score (a "
                  "maximum over layers, not a cross-validated choice); each SVCCA/PWCCA score is itself held out, "
                  "CKA is in sample; the baseline is the shuffled floor at that layer, and 'above' means the "
                  "score's 95 % interval lies above the floor's 97.5 % point."]
    return lines


def _report(profile: pd.DataFrame, sims: dict, options: dict, files: list[Path], target: str,
            provenance: dict[str, dict] | None = None, figures: Sequence[tuple[str, Path]] = ()) -> str:
    """The text of ``analysis.md`` (also rendered as ``report.html``)."""
    provenance = provenance or {}
    labels = {name: p.get("label", name) for name, p in provenance.items()}
    lines = ["# Layer-wise analysis", ""]
    head = _headline(profile, labels, target)
    if head:
        lines += ["## Headline", ""] + head + [""]
    lines += ["Options: " + ", ".join(f"{k}={v}" for k, v in options.items()), "",
              "SVCCA/PWCCA are held-out canonical correlations (CCA fitted on training folds, scored on "
              "held-out items, averaged over repeated fold assignments); CKA is in-sample linear CKA. "
              "Intervals: 95 % bootstrap over speakers (CCA refitted per draw), centred on the estimate. "
              "Floor: the same score with the target shuffled (mean, 2.5-97.5 % over permutations).", ""]
    if provenance:
        lines += ["## Stores", "", tables.markdown_table(provenance_table(provenance)), ""]
    lines += ["## Methods and non-standard choices", ""] + [f"- {n}" for n in method_notes(options)] + [""]
    for store, notes in profile.attrs.get("notes", {}).items():
        lines += [f"## {labels.get(store, store)}", ""] + [f"- {n}" for n in notes] + [""]
        rows = _best_rows(profile, store)
        if not rows:
            continue
        lines += ["| method | target | best layer | score [95% CI] | shuffled floor at that layer |",
                  "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['target']} | {r['layer']} | {_fmt(r['score'])} "
                         f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['floor']) if r['floor'] == r['floor'] else '-'} |")
        lines.append("")
        for method, layer in crossovers(profile, store, target).items():
            lines.append(f"- {method}: " + (f"crossover at layer {layer} ({target} rising above the speaker "
                                             "while the speaker score falls)" if layer is not None
                                             else "no crossover of the target and speaker curves"))
        if crossovers(profile, store, target):
            lines.append("")
    if sims:
        lines += ["## Layer-to-layer similarity", ""]
        for (a, b, method), (m, _, _) in sims.items():
            diag = np.diag(m) if m.shape[0] == m.shape[1] else np.array([])
            extra = f", mean diagonal {_fmt(float(np.nanmean(diag)))}" if diag.size else ""
            lines.append(f"- {method} {labels.get(a, a)} vs {labels.get(b, b)}: {m.shape[0]} x {m.shape[1]} layers{extra}")
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures:
            lines += [f"### {title}", "", tables.markdown_image(title, Path(path).name), ""]
    lines += ["## Files", ""] + [f"- `{f.name}`" for f in files] + [""]
    return "\n".join(lines)


@dataclass
class AnalysisResult:
    profile: pd.DataFrame
    similarity: dict  # (name_a, name_b, method) -> (matrix, layers_a, layers_b)
    out: Path
    files: list[Path]
    #: store name -> provenance (:mod:`probes.provenance`; ``label`` names controls and padded stores)
    stores: dict = field(default_factory=dict)

    def label(self, name: str) -> str:
        return self.stores.get(name, {}).get("label", name)


def default_out(paths: Sequence[PathLike]) -> Path:
    """``cache/analysis/<store stem>/`` (stems joined by ``_vs_`` for several stores)."""
    return Path("cache") / "analysis" / "_vs_".join(store_names(paths))


def run_analysis(
    files: Sequence[PathLike],
    target: str = "label",
    nuisances: Sequence[str] = ("group",),
    methods: Sequence[str] = METHODS,
    level: str = "pooled",
    pooling: str = "mean",
    scope: str = "auto",
    layers: Iterable[int] | None = None,
    n_boot: int = 200,
    n_shuffle: int = 20,
    out: PathLike | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    log: Log | None = None,
) -> AnalysisResult:
    """Profile every store, compare layers (each store with itself, and the first store with each
    other one), and write the table, the plots and ``analysis.md`` to ``out``."""
    paths = _as_paths(files)
    for p in paths:
        if not p.exists():
            _open(p)  # raises the store module's clear message
    layers = layers if layers is None or isinstance(layers, (str, int, LayerSpec)) else list(layers)
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    profile = layer_profile(paths, target, nuisances, methods, level, pooling, scope, layers, n_boot, n_shuffle,
                            seed=seed, n_jobs=n_jobs, log=log)
    names = store_names(paths)
    prov = {name: store_provenance(p, name) for name, p in zip(names, paths)}
    labels = {name: prov[name]["label"] for name in names}
    written, figures = [], []
    written.append(tables.write_csv(profile, out / "profile.csv"))
    for name in names:
        if (profile.store == name).any():
            fig = plots.plot_analysis_profile(profile, name, out / f"profile_{name}.png", labels[name],
                                              crossovers(profile, name, target))
            written.append(fig)
            figures.append((f"Layer profile — {labels[name]}", fig))
    pairs = [(0, j) for j in range(1, len(paths))] + [(i, i) for i in range(len(paths))]
    sims: dict = {}
    for i, j in pairs:
        rows = []
        for method in methods:
            m = layer_similarity(paths[i], None if i == j else paths[j], method, level, pooling, scope,
                                 layers, layers, seed=seed, log=log if method == methods[0] else None)
            with _open(paths[i]) as a, _open(paths[j]) as b:
                la, lb = _layers(a, layers), _layers(b, layers)
            sims[(names[i], names[j], method)] = (m, la, lb)
            rows += [dict(method=method, layer_a=x, layer_b=y, score=float(m[r, c]))
                     for r, x in enumerate(la) for c, y in enumerate(lb)]
            fig = plots.plot_similarity(m, out / f"similarity_{names[i]}_{names[j]}_{method}.png",
                                        labels[names[i]], labels[names[j]], method, la, lb)
            written.append(fig)
            figures.append((f"{method}: {labels[names[i]]} vs {labels[names[j]]}", fig))
        written.append(tables.write_csv(pd.DataFrame(rows, columns=["method", "layer_a", "layer_b", "score"]),
                                        out / f"similarity_{names[i]}_{names[j]}.csv"))
    options = dict(target=target, nuisances=",".join(nuisances), methods=",".join(methods), level=level,
                   pooling=pooling if level == "pooled" else "-", scope=scope, n_boot=n_boot, n_shuffle=n_shuffle,
                   seed=seed, keep=KEEP, max_dims="auto", n_splits=N_SPLITS, n_repeats=N_REPEATS)
    report, page = out / "analysis.md", out / "report.html"
    written += [report, page]
    text = _report(profile, sims, options, written, target, prov, figures)
    tables.write_text(text, report)
    write_html(text, page, "Layer-wise analysis — " + ", ".join(labels.values()))
    return AnalysisResult(profile, sims, out, written, prov)

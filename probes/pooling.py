"""Pooling of an item's frames into one vector, read from a store one layer at a time.

Pooling only ever sees an item's *span*: its true frames (scope ``clip``) or its segment's frames
(scope ``segment``), never padding and never a neighbour's frames. Spans are computed from the
store's ``items/`` table (``offset``, ``num_frames``, ``segment_start_frame``,
``segment_end_frame``); see :func:`item_spans`.

Methods (:data:`POOLINGS`): ``mean``; ``stats`` = concat(mean, std) (population std, length
``2 * dim``); ``max``; ``center`` = the centre frame ``(T - 1) // 2``, or the mean of the
``center_k`` centre frames ``[(T - k) // 2, (T - k) // 2 + k)`` (all frames when ``k >= T``);
``first``; ``last``.

:func:`pooled_matrix` reads a layer once, pools every item vectorised (sparse averaging
matrices and ``np.maximum.reduceat`` over the spans) and caches the result in the store's
``pooled/<scope>-<method>/NN`` (NaN rows for items without frames; ``center`` with ``k > 1`` is
``center<k>``). Fill the cache from one process before fanning out to workers: a worker that
cannot open the file for writing (another handle holds it) simply does not cache.
"""
from __future__ import annotations

import warnings
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from featstore.store import Store, layer_name, write_pooled

POOLINGS = ("mean", "stats", "max", "center", "first", "last")
SCOPES = ("auto", "clip", "segment")

#: frames gathered per vectorised block (bounds memory on large stores)
_BLOCK_FRAMES = 1 << 15


# ---------------------------------------------------------------------------------------------
# Pooling arrays
# ---------------------------------------------------------------------------------------------
def _check_method(method: str, center_k: int = 1) -> None:
    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {method!r}; use one of {', '.join(POOLINGS)}")
    if isinstance(center_k, bool) or not isinstance(center_k, (int, np.integer)) or center_k < 1:
        raise ValueError(f"center_k must be a positive integer, got {center_k!r}")


def _span_index(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of all spans, concatenated, and the CSR row pointer of each span in them."""
    lengths = stops - starts
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return np.repeat(starts - indptr[:-1], lengths) + np.arange(int(indptr[-1]), dtype=np.int64), indptr


def _span_operator(starts: np.ndarray, stops: np.ndarray, n: int, cols: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse ``(n_spans, n)`` averaging matrix: row i holds ``1 / len_i`` on ``[starts[i], stops[i])``."""
    lengths = stops - starts
    index, indptr = _span_index(starts, stops)
    cols = index if cols is None else cols
    return sp.csr_matrix((np.repeat(1.0 / lengths, lengths), cols, indptr), shape=(len(lengths), n))


def _span_max(data: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], stops[order]
    if len(s) > 1 and (s[1:] < e[:-1]).any():  # overlapping spans: one max per span
        return np.stack([data[a:b].max(axis=0) for a, b in zip(starts, stops)])
    idx = np.empty(2 * len(s), dtype=np.int64)
    idx[0::2], idx[1::2] = s, e
    if idx[-1] == len(data):
        idx = idx[:-1]
    out = np.empty((len(s), data.shape[1]), dtype=data.dtype)
    out[order] = np.maximum.reduceat(data, idx, axis=0)[0::2]
    return out


def _pool_spans(data: np.ndarray, starts: np.ndarray, stops: np.ndarray, method: str, center_k: int) -> np.ndarray:
    """Pool ``data[starts[i]:stops[i]]`` for every span (all non-empty); returns float32 rows.

    Means are sparse averaging products in float64; nothing outside the spans enters a result.
    """
    lengths = stops - starts
    if method == "first":
        out = data[starts]
    elif method == "last":
        out = data[stops - 1]
    elif method == "center":
        k = np.minimum(center_k, lengths)
        lo = starts + (lengths - k) // 2
        out = data[lo] if center_k == 1 else _span_operator(lo, lo + k, len(data)) @ data.astype(np.float64)
    elif method == "max":
        out = _span_max(data, starts, stops)
    elif method == "mean":
        out = _span_operator(starts, stops, len(data)) @ data.astype(np.float64)
    else:  # stats: two-pass over each span's own frames, in float64
        index, _ = _span_index(starts, stops)
        x = data[index].astype(np.float64)
        op = _span_operator(starts, stops, len(index), cols=np.arange(len(index)))
        mean = op @ x
        x -= np.repeat(mean, lengths, axis=0)
        out = np.concatenate([mean, np.sqrt(op @ (x * x))], axis=1)
    return np.asarray(out, dtype=np.float32)


def pool_frames(frames: np.ndarray, method: str, center_k: int = 1) -> np.ndarray:
    """Pool one item's ``(T, D)`` frames into a 1-D float32 vector (``2 * D`` for ``stats``)."""
    _check_method(method, center_k)
    frames = np.asarray(frames)
    if frames.ndim != 2:
        raise ValueError(f"frames must be a 2-D (num_frames, dim) array, got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("cannot pool an item with 0 frames")
    t = frames.shape[0]
    return _pool_spans(frames, np.array([0]), np.array([t]), method, int(center_k))[0]


# ---------------------------------------------------------------------------------------------
# Spans
# ---------------------------------------------------------------------------------------------
# spans live in featstore (the store's reader side), shared with featstore.torchdata
from featstore.spans import describe_rows as _ids  # noqa: E402
from featstore.spans import item_spans, resolve_scope  # noqa: E402,F401 - part of this module's API


def scope_summary(store: Store, scope: str = "auto") -> dict[str, Any]:
    """Counts for a report: scope used, items, items with frames, empty-segment fallbacks."""
    real = resolve_scope(store, scope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, fallback = item_spans(store, real, return_fallback=True)
    nfr = store.column("num_frames")
    return {"scope": real, "items": int(len(nfr)), "items_with_frames": int((nfr > 0).sum()),
            "empty_segment_fallbacks": int(fallback.sum())}


def _rows(store: Store, rows: np.ndarray | None) -> np.ndarray:
    n = store.num_items
    if rows is None:
        return np.arange(n)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"a boolean row mask must have shape ({n},), got {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError("rows must be a 1-D array of integer row indices or a boolean mask")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < -n or rows.max() >= n):
        raise ValueError(f"row indices must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    return rows % n if rows.size else rows


def _check_rows_have_frames(store: Store, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
    empty = np.zeros(store.num_items, dtype=bool)
    empty[rows] = (stops[rows] - starts[rows]) <= 0
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} of the requested items have no frames ({_ids(store, empty)}); "
            "select items with frames (e.g. status == 'ok')"
        )


def _check_layer(store: Store, layer: int) -> int:
    """A stored layer's model index (``layers/NN``); negative values count from the last one."""
    ids = store.layer_ids
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (layer in ids or -len(ids) <= layer < 0):
        raise ValueError(f"layer {layer!r} does not exist: the store has layers {_fmt_ids(ids)}")
    return int(layer) if layer >= 0 else ids[layer]


def _fmt_ids(ids: list[int]) -> str:
    return f"0..{ids[-1]}" if ids == list(range(len(ids))) else ", ".join(map(str, ids))


def _read_block(store: Store, layer: int, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, int]:
    """One sequential read of ``layers/NN[lo:hi]`` covering the given non-empty spans."""
    lo, hi = int(starts.min()), int(stops.max())
    data = store.h5["layers"][layer_name(layer)][lo:hi]
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    return data, lo


# ---------------------------------------------------------------------------------------------
# Store-level pooling
# ---------------------------------------------------------------------------------------------
def cache_key(scope: str, method: str, center_k: int = 1) -> str:
    """Name of the ``pooled/`` group for a (resolved) scope and method, e.g. ``segment-center3``."""
    return f"{scope}-{method}" + (str(center_k) if method == "center" and center_k != 1 else "")


def _pool_store(store: Store, layer: int, method: str, starts: np.ndarray, stops: np.ndarray,
                center_k: int) -> np.ndarray:
    """Pool every item of the store (NaN rows for empty spans)."""
    dim = store.layer_dim(layer) * (2 if method == "stats" else 1)
    out = np.full((store.num_items, dim), np.nan, dtype=np.float32)
    live = np.flatnonzero(stops > starts)
    if not len(live):
        return out
    data, lo = _read_block(store, layer, starts[live], stops[live])
    order = live[np.argsort(starts[live], kind="stable")]
    cum = np.cumsum(stops[order] - starts[order])
    cut = np.unique(np.searchsorted(cum, np.arange(_BLOCK_FRAMES, int(cum[-1]), _BLOCK_FRAMES)))
    for block in np.split(order, cut):
        if len(block):
            b_lo, b_hi = int(starts[block].min()) - lo, int(stops[block].max()) - lo
            out[block] = _pool_spans(data[b_lo:b_hi], starts[block] - lo - b_lo, stops[block] - lo - b_lo,
                                     method, center_k)
    return out


def _write_cache(store: Store, key: str, layer: int, values: np.ndarray) -> bool:
    """Store ``values`` in ``pooled/<key>/NN``; False (no cache) when the file is not writable."""
    try:
        if store.h5.mode == "r+":
            name = f"pooled/{key}/{layer_name(layer)}"
            if name in store.h5:
                del store.h5[name]
            store.h5.create_dataset(name, data=values)
            store.h5.flush()
            return True
        path = store.path
        store.h5.close()
        try:
            write_pooled(path, key, layer, values)
        finally:
            store.h5 = h5py.File(path, "r")
        return True
    except OSError:
        return False


def pooled_matrix(
    store: Store,
    layer: int,
    method: str,
    scope: str = "auto",
    rows: np.ndarray | None = None,
    cache: bool = True,
    center_k: int = 1,
) -> np.ndarray:
    """Pooled vectors ``(n_rows, dim)`` float32 of one layer (``2 * dim`` for ``stats``).

    Uses ``pooled/<scope>-<method>/NN`` when the store holds it; otherwise reads the layer once,
    pools all items and (``cache=True``) writes the cache when the file can be opened for writing.
    ``rows`` (indices or a boolean mask, default all items) must all have frames.
    """
    _check_method(method, center_k)
    layer = _check_layer(store, layer)
    real = resolve_scope(store, scope)
    rows = _rows(store, rows)
    key = cache_key(real, method, int(center_k))
    starts, stops = item_spans(store, real)
    _check_rows_have_frames(store, rows, starts, stops)
    values = store.pooled(key, layer)
    if values is None or values.shape[0] != store.num_items:
        values = _pool_store(store, layer, method, starts, stops, int(center_k))
        if cache:
            _write_cache(store, key, layer, values)
    return np.ascontiguousarray(values[rows], dtype=np.float32)


def all_layers_matrix(
    store: Store,
    method: str,
    scope: str = "auto",
    layers: Any = None,
    rows: np.ndarray | None = None,
    cache: bool = True,
    center_k: int = 1,
) -> np.ndarray:
    """Pooled vectors of several layers stacked as ``(n_rows, n_layers, dim)`` (default all layers).

    Input of the weighted-layers probe; the layers must have equal widths.
    """
    layers = list(store.layer_ids) if layers is None else [_check_layer(store, k) for k in layers]
    if not layers:
        raise ValueError("layers is empty")
    dims = {store.layer_dim(k) for k in layers}
    if len(dims) > 1:
        raise ValueError(f"layers {layers} have different widths {sorted(dims)}; pick layers of equal width")
    mats = [pooled_matrix(store, k, method, scope, rows, cache=cache, center_k=center_k) for k in layers]
    return np.stack(mats, axis=1)


def frame_sequences(
    store: Store,
    layer: int,
    scope: str = "auto",
    rows: np.ndarray | None = None,
    max_frames: int | None = None,
) -> list[np.ndarray]:
    """Each row's ``(T_i, dim)`` float32 frames of its span (clip or segment), one layer read.

    ``max_frames`` keeps at most that many frames, centred in the span.
    """
    layer = _check_layer(store, layer)
    if max_frames is not None and (not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    rows = _rows(store, rows)
    starts, stops = item_spans(store, resolve_scope(store, scope))
    _check_rows_have_frames(store, rows, starts, stops)
    if not len(rows):
        return []
    s, e = starts[rows], stops[rows]
    if max_frames is not None:
        length = e - s
        s = s + np.maximum(length - max_frames, 0) // 2
        e = s + np.minimum(length, max_frames)
    data, lo = _read_block(store, layer, s, e)
    return [data[a - lo : b - lo].copy() for a, b in zip(s, e)]

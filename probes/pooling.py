"""Pooling of an item's frames into one vector: the one pooling implementation of the project
(used by the sweep, the analysis, ``probes fit``/``predict`` and the doctor).

Pooling only ever sees an item's *span*: its true frames (scope ``clip``) or its segment's frames
(scope ``segment``), never padding and never a neighbour's frames. Spans are computed from the
store's ``items/`` table (``offset``, ``num_frames``, ``segment_start_frame``,
``segment_end_frame``); see :func:`item_spans`.

Methods (:data:`POOLINGS`): ``mean``; ``stats`` = concat(mean, std) (population std, length
``2 * dim``); ``max``; ``center`` = the centre frame ``(T - 1) // 2``, or the mean of the
``center_k`` centre frames ``[(T - k) // 2, (T - k) // 2 + k)`` (all frames when ``k >= T``);
``first``; ``last``.

Memory is bounded by the chunk, not by the store: :func:`pooled_matrix` streams the layer in
offset-sorted chunks (:meth:`featstore.store.Store.iter_span_chunks`, about
``featstore.store.CHUNK_BYTES`` of float64 working memory each), pools the spans of each chunk
vectorised (sparse averaging matrices, ``np.maximum.reduceat``) and merges the pieces of a span
longer than a chunk exactly (sums, Chan's update of mean and squared deviations, running max).
Frames are read in their stored dtype: no float32 copy of a float16 layer is made.

Pooled vectors of all items are cached beside the store (:mod:`probes.cache`; never inside the
store file, which stays immutable; NaN rows for items without frames); ``center`` with ``k > 1``
is cached as ``center<k>``.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from featstore.layerspec import format_layers
from featstore.store import Store
from probes.names import POOLINGS, SCOPES

__all__ = ["POOLINGS", "SCOPES", "pool_frames", "resolve_scope", "item_spans", "scope_summary", "cache_key",
           "pooled_matrix", "all_layers_matrix", "frame_batch", "frame_sequences"]


# ---------------------------------------------------------------------------------------------
# Pooling arrays
# ---------------------------------------------------------------------------------------------
def _check_method(method: str, center_k: int = 1) -> None:
    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {method!r}; use one of {', '.join(POOLINGS)}")
    if isinstance(center_k, bool) or not isinstance(center_k, (int, np.integer)) or center_k < 1:
        raise ValueError(f"center_k must be a positive integer, got {center_k!r}")


def _f64(data: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
    """A float64 copy (exact; ``np.copyto`` converts float16 several times faster than ``astype``),
    into the reusable buffer ``work`` when it is large enough (no allocation per chunk)."""
    if work is not None and len(work) >= len(data) and work.shape[1:] == data.shape[1:]:
        out = work[: len(data)]
    else:
        out = np.empty(data.shape, dtype=np.float64)
    np.copyto(out, data)
    return out


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


def _pool_spans(data: np.ndarray, starts: np.ndarray, stops: np.ndarray, method: str, center_k: int,
                work: np.ndarray | None = None) -> np.ndarray:
    """Pool ``data[starts[i]:stops[i]]`` for every span (all non-empty); returns float32 rows.

    Means are sparse averaging products in float64; nothing outside the spans enters a result.
    ``work`` is an optional float64 buffer of at least ``len(data)`` rows, reused across chunks so
    that streaming allocates nothing of the chunk's size.
    """
    lengths = stops - starts
    if method == "first":
        out = data[starts]
    elif method == "last":
        out = data[stops - 1]
    elif method == "center":
        k = np.minimum(center_k, lengths)
        lo = starts + (lengths - k) // 2
        out = data[lo] if center_k == 1 else _span_operator(lo, lo + k, len(data)) @ _f64(data, work)
    elif method == "max":
        out = _span_max(data, starts, stops)
    elif method == "mean":
        out = _span_operator(starts, stops, len(data)) @ _f64(data, work)
    else:  # stats: two-pass over each span's own frames, in float64
        index, indptr = _span_index(starts, stops)
        contiguous = len(index) and index[-1] - index[0] + 1 == len(index) and (np.diff(index) == 1).all()
        x = _f64(data[index[0] : index[-1] + 1] if contiguous else data[index], work)
        op = _span_operator(starts, stops, len(index), cols=np.arange(len(index)))
        mean = op @ x
        for a, b, mu in zip(indptr[:-1].tolist(), indptr[1:].tolist(), mean):  # in place: no (frames, dim) temp
            x[a:b] -= mu
        np.multiply(x, x, out=x)
        out = np.concatenate([mean, np.sqrt(op @ x)], axis=1)
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
        raise ValueError(f"layer {layer!r} does not exist: the store has layers {format_layers(ids)}")
    return int(layer) if layer >= 0 else ids[layer]


# ---------------------------------------------------------------------------------------------
# Streaming store-level pooling
# ---------------------------------------------------------------------------------------------
def cache_key(scope: str, method: str, center_k: int = 1) -> str:
    """Name of a pooled entry for a (resolved) scope and method, e.g. ``segment-center3``."""
    return f"{scope}-{method}" + (str(center_k) if method == "center" and center_k != 1 else "")


def _reduction(method: str, center_k: int, starts: np.ndarray, stops: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Every pooling as one of three reductions (mean, max, stats) over a sub-span of each span:
    ``first``/``last``/``center`` are means over the frames they pick (exact: a mean of one frame
    is that frame)."""
    lengths = stops - starts
    if method == "first":
        return "mean", starts, starts + 1
    if method == "last":
        return "mean", stops - 1, stops
    if method == "center":
        k = np.minimum(center_k, lengths)
        lo = starts + (lengths - k) // 2
        return "mean", lo, lo + k
    return method, starts, stops


class _Long:
    """Accumulator of one span read in several pieces (exact merge of per-piece results)."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self.max: np.ndarray | None = None

    def add(self, piece: np.ndarray, reducer: str) -> None:
        if reducer == "max":
            m = piece.max(axis=0)
            self.max = m if self.max is None else np.maximum(self.max, m)
            return
        x = _f64(piece)
        nb = len(x)
        mb = x.mean(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        if reducer == "stats":
            self.m2 += ((x - mb) ** 2).sum(axis=0) + delta**2 * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def result(self, reducer: str) -> np.ndarray:
        if reducer == "max":
            return self.max
        if reducer == "stats":
            return np.concatenate([self.mean, np.sqrt(self.m2 / self.n)])
        return self.mean


def _pool_streamed(store: Store, layer: int, method: str, starts: np.ndarray, stops: np.ndarray,
                   center_k: int, chunk_frames: int | None = None) -> np.ndarray:
    """Pooled vectors of every span (NaN rows for empty spans), streamed in offset-sorted chunks."""
    dim = store.layer_dim(layer)
    out = np.full((len(starts), dim * (2 if method == "stats" else 1)), np.nan, dtype=np.float32)
    live = stops > starts
    if not live.any():
        return out
    reducer, s, e = _reduction(method, center_k, starts, stops)
    s = np.where(live, s, 0)
    e = np.where(live, e, 0)
    long: dict[int, _Long] = {}
    size = store.chunk_frames(layer) if chunk_frames is None else max(1, int(chunk_frames))
    work = np.empty((size, dim), dtype=np.float64)  # one float64 buffer for every chunk
    for chunk in store.iter_span_chunks(layer, s, e, size, reuse_buffer=True):
        if chunk.partial:
            i = int(chunk.spans[0])
            acc = long.setdefault(i, _Long(dim))
            acc.add(chunk.data, reducer)
            if chunk.lo + len(chunk.data) >= e[i]:
                out[i] = long.pop(i).result(reducer)
            continue
        idx = chunk.spans
        out[idx] = _pool_spans(chunk.data, s[idx] - chunk.lo, e[idx] - chunk.lo, reducer, 1, work)
    return out


def pooled_matrix(
    store: Store,
    layer: int,
    method: str,
    scope: str = "auto",
    rows: np.ndarray | None = None,
    cache: bool = True,
    center_k: int = 1,
    chunk_frames: int | None = None,
) -> np.ndarray:
    """Pooled vectors ``(n_rows, dim)`` float32 of one layer (``2 * dim`` for ``stats``).

    With ``cache=True`` all items are pooled once and kept beside the store (:mod:`probes.cache`);
    later calls read that entry. With ``cache=False`` only ``rows`` are pooled and nothing is
    written. ``rows`` (indices or a boolean mask, default all items) must all have frames.
    ``chunk_frames`` overrides the streaming chunk size (frames per read).
    """
    from probes.cache import PooledCache

    _check_method(method, center_k)
    layer = _check_layer(store, layer)
    real = resolve_scope(store, scope)
    rows = _rows(store, rows)
    key = cache_key(real, method, int(center_k))
    starts, stops = item_spans(store, real)
    _check_rows_have_frames(store, rows, starts, stops)
    if not cache:
        uniq, inverse = np.unique(rows, return_inverse=True)
        values = _pool_streamed(store, layer, method, starts[uniq], stops[uniq], int(center_k), chunk_frames)
        return values if np.array_equal(uniq, rows) else values[inverse.reshape(-1)]  # no copy when sorted
    pc = PooledCache(store)
    shape = (store.num_items, store.layer_dim(layer) * (2 if method == "stats" else 1))
    values = pc.get(key, layer, shape)
    if values is None:
        values = _pool_streamed(store, layer, method, starts, stops, int(center_k), chunk_frames)
        pc.put(key, layer, values)
    if np.array_equal(rows, np.arange(store.num_items)):
        return values
    return np.ascontiguousarray(values[rows], dtype=np.float32)


def all_layers_matrix(
    store: Store,
    method: str,
    scope: str = "auto",
    layers: Any = None,
    rows: np.ndarray | None = None,
    cache: bool = True,
    center_k: int = 1,
    chunk_frames: int | None = None,
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
    mats = [pooled_matrix(store, k, method, scope, rows, cache=cache, center_k=center_k, chunk_frames=chunk_frames)
            for k in layers]
    return np.stack(mats, axis=1)


def frame_batch(
    store: Store,
    layer: int,
    scope: str = "auto",
    rows: np.ndarray | None = None,
    max_frames: int | None = None,
    chunk_frames: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's span frames (clip or segment) packed into one float32 array: ``(data, lengths)``
    with row ``j``'s frames at ``data[sum(lengths[:j]) : sum(lengths[:j + 1])]``.

    The layer is streamed in offset-sorted chunks; the only full-size array is the result itself
    (what a frame-sequence probe trains on). ``max_frames`` keeps at most that many frames, centred
    in the span.
    """
    layer = _check_layer(store, layer)
    if max_frames is not None and (not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    rows = _rows(store, rows)
    starts, stops = item_spans(store, resolve_scope(store, scope))
    _check_rows_have_frames(store, rows, starts, stops)
    dim = store.layer_dim(layer)
    if not len(rows):
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    s, e = starts[rows], stops[rows]
    if max_frames is not None:
        length = e - s
        s = s + np.maximum(length - max_frames, 0) // 2
        e = s + np.minimum(length, max_frames)
    lengths = (e - s).astype(np.int64)
    pos = np.concatenate([[0], np.cumsum(lengths)])
    data = np.empty((int(pos[-1]), dim), dtype=np.float32)
    for chunk in store.iter_span_chunks(layer, s, e, chunk_frames):
        if chunk.partial:
            j = int(chunk.spans[0])
            at = pos[j] + chunk.lo - s[j]
            data[at : at + len(chunk.data)] = chunk.data
            continue
        for j in chunk.spans.tolist():
            data[pos[j] : pos[j + 1]] = chunk.data[s[j] - chunk.lo : e[j] - chunk.lo]
    return data, lengths


def frame_sequences(
    store: Store,
    layer: int,
    scope: str = "auto",
    rows: np.ndarray | None = None,
    max_frames: int | None = None,
    chunk_frames: int | None = None,
) -> list[np.ndarray]:
    """Each row's ``(T_i, dim)`` float32 frames of its span (clip or segment): views into one
    :func:`frame_batch` array. ``max_frames`` keeps at most that many frames, centred in the span.
    """
    data, lengths = frame_batch(store, layer, scope, rows, max_frames, chunk_frames)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

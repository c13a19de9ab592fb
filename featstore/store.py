"""The on-disk HDF5 store (layout ``format_version`` 1) — writer and lazy reader.

Layout (documented in README.md, "The HDF5 layout"):

* root attributes: provenance (``format``, ``format_version``, ``encoder``, ``sample_rate``, ...);
* ``items/<column>``: 1-D datasets, one row per manifest row, in manifest order;
* ``layers/NN``: ``(total_frames, dim)`` per layer, the frames of all items concatenated; item ``i``
  is ``layers/NN[offset[i] : offset[i] + num_frames[i]]``;
* ``pooled/<scope>-<method>/NN``: optional cache of pooled vectors ``(num_items, dim)`` written
  into finished stores by older versions; nothing writes it any more (caches live beside the store,
  see ``probes.cache``), and readers ignore it (it carries no code or library version).

This module knows nothing about models: it stores arrays and strings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

FORMAT = "featstore"
FORMAT_VERSION = 1
STR = h5py.string_dtype(encoding="utf-8")

#: fixed ``items/`` columns and their kinds ("s" string, "i" int64, "f" float64)
ITEM_COLUMNS: dict[str, str] = {
    "id": "s", "path": "s", "label": "s", "group": "s",
    "num_samples": "i", "num_frames": "i", "offset": "i",
    "segment_start_frame": "i", "segment_end_frame": "i",
    "sha256": "s", "rms_db": "f", "status": "s", "error": "s", "note": "s",
}
#: status of a row that has not been processed yet (only ever seen in a ``.partial`` file)
PENDING = "pending"
OK = "ok"
REQUIRED_ATTRS = (
    "format", "format_version", "encoder", "encoder_revision", "encoder_config", "sample_rate",
    "frame_stride_samples", "receptive_field_samples", "first_frame_center_samples", "num_layers",
    "dtype", "manifest_sha256", "created_at", "versions", "padding_exact", "padding_audit",
)


def layer_name(k: int) -> str:
    """Dataset name of layer ``k`` inside ``layers/`` (``00``, ``01``, ...)."""
    return f"{k:02d}"


def _default(kind: str) -> Any:
    return {"s": "", "i": -1, "f": np.nan}[kind]


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "OS":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


class StoreWriter:
    """Incremental writer of one store file.

    The file is built under ``<path>.partial`` and renamed to ``path`` by :meth:`finalize`, so a
    finished store is never half-written under its final name. Rows are pre-allocated in manifest
    order with status ``pending``; :meth:`write_items` appends the frames of finished items and then
    commits their rows, so an interrupted run leaves a ``.partial`` file that :meth:`open` resumes.
    """

    def __init__(self, h5: h5py.File, path: Path):
        self.h5 = h5
        self.path = Path(path)

    # -- creation / resume -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        rows: Sequence[Mapping[str, Any]],
        attrs: Mapping[str, Any],
        layer_dims: Sequence[int],
        dtype: str = "float32",
        extra_columns: Sequence[str] = (),
        chunk_frames: int = 4096,
        layer_ids: Sequence[int] | None = None,
    ) -> "StoreWriter":
        """Create ``<path>.partial`` with one pending row per manifest row.

        ``layer_ids`` names the stored layers (model layer indices, default ``0..L-1``).
        """
        layer_ids = list(range(len(layer_dims))) if layer_ids is None else list(layer_ids)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        h5 = h5py.File(partial, "w")
        for key, value in attrs.items():
            h5.attrs[key] = _attr(value)
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["num_layers"] = len(layer_dims)
        h5.attrs["dtype"] = dtype
        h5.attrs["committed_frames"] = 0
        n = len(rows)
        items = h5.create_group("items")
        for col, kind in ITEM_COLUMNS.items():
            vals = [r.get(col, _default(kind)) for r in rows]
            if col == "status":
                vals = [PENDING] * n
            _create_column(items, col, kind, vals)
        for col in extra_columns:
            _create_column(items, col, "s", [str(r.get(col, "") or "") for r in rows])
        items.attrs["extra_columns"] = json.dumps(list(extra_columns))
        layers = h5.create_group("layers")
        for k, dim in zip(layer_ids, layer_dims):
            layers.create_dataset(
                layer_name(k), shape=(0, int(dim)), maxshape=(None, int(dim)), dtype=dtype,
                chunks=(max(1, min(chunk_frames, max(1, 2**20 // (4 * int(dim))))), int(dim)),
            )
        h5.flush()
        return cls(h5, path)

    @classmethod
    def resume(cls, path: str | os.PathLike, expect: Mapping[str, Any]) -> "StoreWriter":
        """Reopen ``<path>.partial``; refuse it when any attribute in ``expect`` differs.

        Frames appended after the last committed batch (an interruption between the two steps
        of :meth:`write_items`) are cut off, so the resumed store equals an uninterrupted one.
        """
        path = Path(path)
        h5 = h5py.File(partial_path(path), "r+")
        for key, value in expect.items():
            have = h5.attrs.get(key)
            if _norm(have) != _norm(_attr(value)):
                h5.close()
                raise StoreMismatch(
                    f"{partial_path(path)} was started with {key}={_short(have)}, this run has "
                    f"{key}={_short(_attr(value))}; delete it or use another --out"
                )
        committed = int(h5.attrs["committed_frames"])
        for ds in h5["layers"].values():
            if ds.shape[0] != committed:
                ds.resize(committed, axis=0)
        return cls(h5, path)

    # -- writing ---------------------------------------------------------------------------
    def pending_rows(self) -> np.ndarray:
        """Indices of rows not yet processed."""
        status = _decode(self.h5["items/status"][:])
        return np.flatnonzero(status == PENDING)

    def write_items(self, results: Sequence[tuple[int, Mapping[str, Any], Sequence[np.ndarray] | None]]) -> None:
        """Append a batch: each entry is ``(row, fields, layers)``.

        ``layers`` is a list with one ``(num_frames, dim_k)`` array per layer, or ``None`` for a
        failed item (0 frames). ``fields`` sets ``items/`` columns (status, error, note, ...).
        """
        committed = int(self.h5.attrs["committed_frames"])
        layers = self.h5["layers"]
        names = sorted(layers.keys(), key=int)
        total = committed
        offsets = []
        for _, _, frames in results:
            n = 0 if frames is None else int(frames[0].shape[0])
            offsets.append((total, n))
            total += n
        if total > committed:
            for pos, name in enumerate(names):
                ds = layers[name]
                ds.resize(total, axis=0)
                block = [f[pos] for _, _, f in results if f is not None and f[0].shape[0] > 0]
                ds[committed:total] = np.concatenate(block, axis=0).astype(ds.dtype, copy=False)
        items = self.h5["items"]
        for (row, fields, frames), (off, n) in zip(results, offsets):
            values = dict(fields)
            values["offset"] = off if n else 0
            values["num_frames"] = n
            values.setdefault("status", OK)
            for col, val in values.items():
                if col in items:
                    items[col][row] = val
        self.h5.attrs["committed_frames"] = total
        self.h5.flush()

    def set_attrs(self, **attrs: Any) -> None:
        for key, value in attrs.items():
            self.h5.attrs[key] = _attr(value)

    def finalize(self) -> Path:
        """Close and move ``.partial`` to the final name (atomic on one file system)."""
        self.h5.attrs["num_items"] = self.h5["items/id"].shape[0]
        self.h5.flush()
        self.h5.close()
        os.replace(partial_path(self.path), self.path)
        return self.path

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.flush()
            self.h5.close()


class StoreMismatch(RuntimeError):
    """A partial store cannot be resumed by this run (different model, manifest or settings)."""


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _create_column(group: h5py.Group, name: str, kind: str, values: Sequence[Any]) -> None:
    if kind == "s":
        group.create_dataset(name, data=np.array([str(v) for v in values], dtype=object), dtype=STR)
    elif kind == "i":
        group.create_dataset(name, data=np.asarray(values, dtype=np.int64))
    else:
        group.create_dataset(name, data=np.asarray(values, dtype=np.float64))


def _attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def _norm(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any, n: int = 80) -> str:
    s = str(_norm(value))
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
#: working memory of one streamed chunk of frames, as float64 (what pooling converts a chunk to)
CHUNK_BYTES = 64 << 20

#: root attributes and ``items/`` columns that define a store's content identity
_IDENTITY_ATTRS = ("format_version", "encoder", "encoder_revision", "encoder_config", "manifest_sha256",
                   "created_at", "num_layers", "dtype", "sample_rate")
_IDENTITY_COLUMNS = ("id", "label", "group", "status", "num_frames", "offset", "segment_start_frame",
                     "segment_end_frame", "sha256")


@dataclass
class SpanChunk:
    """Frames of some spans, read in one sequential slice ``layers/NN[lo : lo + len(data)]``.

    ``spans`` are indices into the span arrays given to :meth:`Store.iter_span_chunks`. When
    ``partial`` is true the chunk is one piece of a single span longer than the chunk size
    (``spans`` holds that one span; ``data`` covers part of it).
    """

    spans: np.ndarray
    lo: int
    data: np.ndarray
    partial: bool = False


@dataclass
class Store:
    """Lazy read access to a store file (see :func:`open_store`).

    ``items`` is a pandas DataFrame of the ``items/`` table; frames are read on demand. Readers of
    many frames stream them: :meth:`iter_span_chunks` (spans in offset order, one sequential slice
    per chunk) and :meth:`read_frames` (chosen frame rows); their memory depends on the chunk size
    (:data:`CHUNK_BYTES`), not on the number of frames in the store.
    """

    path: Path
    h5: h5py.File
    _identity: str | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()

    # -- metadata --------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, JSON strings decoded."""
        out = {}
        for key, value in self.h5.attrs.items():
            value = _norm(value)
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
        return out

    @property
    def num_layers(self) -> int:
        return len(self.h5["layers"])

    @property
    def layer_ids(self) -> list[int]:
        """Model layer index of each stored layer (``layers/NN`` names), ascending."""
        return sorted(int(name) for name in self.h5["layers"])

    @property
    def num_items(self) -> int:
        return int(self.h5["items/id"].shape[0])

    def layer_dim(self, k: int) -> int:
        return int(self.h5["layers"][layer_name(k)].shape[1])

    @property
    def extra_columns(self) -> list[str]:
        return json.loads(_norm(self.h5["items"].attrs.get("extra_columns", "[]")))

    def column(self, name: str) -> np.ndarray:
        """One ``items/`` column as a numpy array (strings as ``object``)."""
        return _decode(self.h5["items"][name][:])

    @property
    def items(self):
        """The ``items/`` table as a pandas DataFrame (one row per manifest row)."""
        import pandas as pd

        return pd.DataFrame({name: self.column(name) for name in self.h5["items"].keys()})

    def identity(self) -> str:
        """Hash of the store's content identity: provenance attributes, the ``items/`` columns that
        place and label frames, and the layer shapes (computed once per open store).

        Caches derived from the store (pooled vectors, sweep cells) are keyed by it; re-extracting a
        store changes ``created_at`` and therefore the identity. A legacy ``pooled/`` group in the
        file does not enter it.
        """
        if self._identity is None:
            import hashlib

            attrs = self.attrs
            h = hashlib.sha256()
            h.update(json.dumps({k: str(attrs.get(k)) for k in _IDENTITY_ATTRS}, sort_keys=True).encode())
            for col in _IDENTITY_COLUMNS:
                if col in self.h5["items"]:
                    h.update(col.encode())
                    h.update("\x1f".join(map(str, self.column(col))).encode())
            for name in sorted(self.h5["layers"]):
                h.update(f"{name}:{self.h5['layers'][name].shape}".encode())
            self._identity = h.hexdigest()
        return self._identity

    # -- frames ----------------------------------------------------------------------------
    def layer(self, k: int) -> np.ndarray:
        """All frames of layer ``k`` (one read of the whole layer: its memory grows with the store;
        use :meth:`iter_span_chunks` or :meth:`read_frames` in code that must scale)."""
        return self.h5["layers"][layer_name(k)][:]

    def frames(self, i: int, k: int) -> np.ndarray:
        """Frames of item ``i`` at layer ``k``: ``(num_frames[i], dim)``."""
        off = int(self.h5["items/offset"][i])
        n = int(self.h5["items/num_frames"][i])
        return self.h5["layers"][layer_name(k)][off : off + n]

    def chunk_frames(self, k: int, chunk_bytes: int | None = None) -> int:
        """Frames per streamed chunk of layer ``k``: ``chunk_bytes`` (default :data:`CHUNK_BYTES`) of
        float64 working memory."""
        budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        return max(1, budget // (8 * max(1, self.layer_dim(k))))

    def iter_span_chunks(self, k: int, starts: np.ndarray, stops: np.ndarray,
                         chunk_frames: int | None = None, reuse_buffer: bool = False) -> Iterator[SpanChunk]:
        """Stream the frames of half-open spans ``[starts[i], stops[i])`` of layer ``k``.

        Spans are visited in offset order and grouped so that each group is one sequential slice of
        at most ``chunk_frames`` frames (default :meth:`chunk_frames`); a span longer than that
        comes in several ``partial`` pieces. Empty spans are skipped. Frames keep the stored dtype
        (no float32 copy of a float16 layer); the memory held is one chunk. With
        ``reuse_buffer=True`` every chunk is read into the same buffer (no allocation per chunk):
        ``data`` is then only valid until the next chunk is requested.
        """
        ds = self.h5["layers"][layer_name(k)]
        size = self.chunk_frames(k) if chunk_frames is None else max(1, int(chunk_frames))
        buf = np.empty((size, ds.shape[1]), dtype=ds.dtype) if reuse_buffer else None

        def read(a: int, b: int) -> np.ndarray:
            if buf is None or b <= a:
                return ds[a:b]
            ds.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
            return buf[: b - a]

        starts = np.asarray(starts, dtype=np.int64)
        stops = np.asarray(stops, dtype=np.int64)
        live = np.flatnonzero(stops > starts)
        order = live[np.argsort(starts[live], kind="stable")]
        group: list[int] = []
        lo = hi = 0
        for i in order.tolist():
            a, b = int(starts[i]), int(stops[i])
            if b - a > size:
                if group:
                    yield SpanChunk(np.asarray(group, dtype=np.int64), lo, read(lo, hi))
                    group = []
                for p in range(a, b, size):
                    yield SpanChunk(np.array([i], dtype=np.int64), p, read(p, min(b, p + size)), partial=True)
                continue
            if group and max(hi, b) - lo > size:
                yield SpanChunk(np.asarray(group, dtype=np.int64), lo, read(lo, hi))
                group = []
            if not group:
                lo, hi = a, b
            group.append(i)
            hi = max(hi, b)
        if group:
            yield SpanChunk(np.asarray(group, dtype=np.int64), lo, read(lo, hi))

    def read_frames(self, k: int, index: np.ndarray, chunk_frames: int | None = None,
                    dtype: Any = None) -> np.ndarray:
        """Frame rows ``index`` of layer ``k`` (any order, repeats allowed), ``(len(index), dim)``,
        read in sorted chunks of at most ``chunk_frames`` frames; ``dtype`` converts (per chunk)."""
        ds = self.h5["layers"][layer_name(k)]
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), ds.shape[1]), dtype=ds.dtype if dtype is None else dtype)
        if not len(index):
            return out
        if index.min() < 0 or index.max() >= ds.shape[0]:
            raise IndexError(f"frame index outside layers/{layer_name(k)} (0..{ds.shape[0] - 1})")
        size = self.chunk_frames(k) if chunk_frames is None else max(1, int(chunk_frames))
        uniq, inverse = np.unique(index, return_inverse=True)
        values = np.empty((len(uniq), ds.shape[1]), dtype=out.dtype)
        first = 0
        while first < len(uniq):
            stop = int(np.searchsorted(uniq, uniq[first] + size, side="left"))
            sel = uniq[first:stop]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            if len(sel) * 8 >= hi - lo:  # dense: one sequential slice
                values[first:stop] = ds[lo:hi][sel - lo]
            else:  # sparse: a point selection (h5py needs increasing indices)
                values[first:stop] = ds[sel]
            first = stop
        out[:] = values[inverse.reshape(-1)]
        return out

    def iter_item_frames(self, k: int, rows: Iterable[int] | None = None,
                         chunk_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row, frames)`` for the given rows (default all, in the order given) at layer ``k``.

        Runs of rows whose frames follow each other in the layer are read as one slice of at most
        ``chunk_frames`` frames (default :meth:`chunk_frames`); an item longer than that is read
        alone. Memory: one chunk (or one item), not the layer.
        """
        offset = self.h5["items/offset"][:].astype(np.int64)
        nfr = self.h5["items/num_frames"][:].astype(np.int64)
        rows = np.arange(self.num_items) if rows is None else np.asarray(list(rows), dtype=np.int64)
        ds = self.h5["layers"][layer_name(k)]
        size = self.chunk_frames(k) if chunk_frames is None else max(1, int(chunk_frames))
        group: list[int] = []
        lo = hi = 0

        def flush():
            data = ds[lo:hi]
            for r in group:
                yield int(r), data[offset[r] - lo : offset[r] + nfr[r] - lo]

        for r in rows.tolist():
            a, b = int(offset[r]), int(offset[r] + nfr[r])
            if group and (a < hi or b - lo > size):
                yield from flush()
                group = []
            if not group:
                lo, hi = a, b
            group.append(r)
            hi = max(hi, b)
        if group:
            yield from flush()

    # -- legacy in-file pooled cache ----------------------------------------------------------
    def pooled(self, key: str, k: int) -> np.ndarray | None:
        """Legacy pooled vectors ``pooled/<key>/NN`` written into the file by older versions, or
        ``None`` (kept readable; the probes no longer use it, see ``probes.cache``)."""
        name = f"pooled/{key}/{layer_name(k)}"
        return self.h5[name][:] if name in self.h5 else None


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    """Open a finished store for reading (a finished store is immutable: readers use ``mode="r"``)."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise FileNotFoundError(
                f"{path} is not finished: {partial_path(path)} holds an interrupted run; run the same "
                "`featstore extract` command again to resume it"
            )
        raise FileNotFoundError(f"no store at {path}")
    h5 = h5py.File(path, mode)
    if _norm(h5.attrs.get("format")) != FORMAT:
        h5.close()
        raise ValueError(f"{path} is not a featstore file (root attribute format != 'featstore')")
    version = int(h5.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        h5.close()
        raise ValueError(f"{path} has format_version {version}; this featstore reads version {FORMAT_VERSION}")
    return Store(path, h5)


def write_pooled(path: str | os.PathLike, key: str, k: int, values: np.ndarray) -> None:
    """Deprecated: writes ``pooled/<key>/NN`` into a finished store, which must stay immutable.

    Nothing in ``featstore`` or ``probes`` calls it any more (pooled caches live beside the store,
    ``probes.cache``); it is kept only so that older callers and tests still run, and will go.
    """
    with h5py.File(path, "a") as h5:
        name = f"pooled/{key}/{layer_name(k)}"
        if name in h5:
            del h5[name]
        h5.create_dataset(name, data=np.asarray(values, dtype=np.float32))


def check_store(path: str | os.PathLike) -> list[str]:
    """Verify the layout and invariants; return a list of problems (empty = valid)."""
    problems: list[str] = []
    try:
        store = open_store(path)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    with store:
        h5 = store.h5
        for key in REQUIRED_ATTRS:
            if key not in h5.attrs:
                problems.append(f"missing root attribute {key!r}")
        if "items" not in h5 or "layers" not in h5:
            return problems + ["missing group items/ or layers/"]
        n = store.num_items
        for col in ITEM_COLUMNS:
            if col not in h5["items"]:
                problems.append(f"missing items/{col}")
            elif h5["items"][col].shape != (n,):
                problems.append(f"items/{col} has shape {h5['items'][col].shape}, expected ({n},)")
        if problems:
            return problems
        if int(h5.attrs["num_layers"]) != store.num_layers:
            problems.append(f"num_layers={h5.attrs['num_layers']} but layers/ holds {store.num_layers}")
        offset = h5["items/offset"][:]
        nfr = h5["items/num_frames"][:]
        status = store.column("status")
        totals = {h5["layers"][name].shape[0] for name in h5["layers"]}
        if len(totals) != 1:
            problems.append(f"layers have different frame totals: {sorted(totals)}")
        total = max(totals) if totals else 0
        if (nfr < 0).any():
            problems.append("negative num_frames")
        if ((offset < 0) | (offset + nfr > total)).any():
            problems.append("an item's frames reach outside the layer arrays")
        if int(nfr.sum()) != total:
            problems.append(f"num_frames sum to {int(nfr.sum())} but layers hold {total} frames")
        live = np.flatnonzero(nfr > 0)
        order = live[np.argsort(offset[live], kind="stable")]
        ends = offset[order] + nfr[order]
        if len(order) > 1 and (offset[order][1:] < ends[:-1]).any():
            problems.append("items' frame ranges overlap")
        if (status == PENDING).any():
            problems.append(f"{int((status == PENDING).sum())} items are still pending")
        bad_ok = np.flatnonzero((status == OK) & (nfr == 0))
        if len(bad_ok):
            problems.append(f"{len(bad_ok)} items have status ok but 0 frames")
        ids = store.column("id")
        if len(set(ids[status == OK])) != int((status == OK).sum()):
            problems.append("duplicate ids among ok items")
        seg_s, seg_e = h5["items/segment_start_frame"][:], h5["items/segment_end_frame"][:]
        has = seg_s >= 0
        if ((seg_e[has] < seg_s[has]) | (seg_e[has] > nfr[has])).any():
            problems.append("a segment lies outside its item's frames")
        for name in h5["layers"]:
            ds = h5["layers"][name]
            if ds.shape[0] and not np.isfinite(ds[: min(ds.shape[0], 65536)]).all():
                problems.append(f"layers/{name} holds non-finite values")
    return problems

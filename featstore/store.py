"""The on-disk HDF5 store (layout ``format_version`` 1) — crash-safe writer and lazy reader.

Layout (documented in README.md, "The HDF5 layout"):

* root attributes: provenance (``format``, ``format_version``, ``encoder``, ``sample_rate``, ...);
* ``items/<column>``: 1-D datasets, one row per manifest row, in manifest order;
* ``layers/NN``: ``(total_frames, dim)`` per layer, the frames of all items concatenated; item ``i``
  is ``layers/NN[offset[i] : offset[i] + num_frames[i]]``;
* ``pooled/<scope>-<method>/NN``: optional cache of pooled vectors ``(num_items, dim)`` written
  into finished stores by older versions; nothing writes it any more (caches live beside the store,
  see ``probes.cache``), and readers ignore it (it carries no code or library version).

Writing is crash-safe. A store is built in a batch directory ``<path>.partial/`` that is never an
HDF5 file, so a kill at any instant cannot leave a half-updated HDF5 structure behind:

* ``run.json`` — the run record (rows, attributes, layer widths, dtype, batch plan), with a
  sha256 of its body, written once to a temporary name, fsynced and renamed;
* ``attrs.json`` — attributes set later (e.g. the padding audit), replaced the same way;
* ``bNNNNNNNN.batch`` — one committed batch each: every layer's frames of its rows as one block
  per layer (a CRC-32 per block, ``"crc32:%08x"``; files of earlier versions carry a sha256, also
  read) and the rows' fields, written to a temporary name, fsynced and atomically renamed
  (``write_items(..., finish_later=True)``: the fsync and rename are returned as a function for
  another thread). A batch is committed exactly when its file exists under its
  final name;
* finishing builds the HDF5 file inside the directory (h5py writes the attributes, ``items/`` and
  one contiguous, 4 KiB-aligned dataset per layer; the layer bytes are then copied from the batch
  files to their file offsets through :class:`featstore.rawio.Sink`, no per-item HDF5 writes), fsyncs it, moves it to ``<path>`` with ``os.replace`` (atomic)
  and removes the directory.

On resume every batch file is verified (size, header checksum, run, rows, block checksums); a
damaged one is deleted and its batch redone, a temporary file of an interrupted commit is removed.

This module knows nothing about models: it stores arrays and strings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from featstore import rawio

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
#: status of a row that has not been processed yet (only ever seen in an unfinished run)
PENDING = "pending"
OK = "ok"
REQUIRED_ATTRS = (
    "format", "format_version", "encoder", "encoder_revision", "encoder_config", "sample_rate",
    "frame_stride_samples", "receptive_field_samples", "first_frame_center_samples", "num_layers",
    "dtype", "manifest_sha256", "created_at", "versions", "padding_exact", "padding_audit",
)
#: attributes that differ between two runs of the same command (not part of a run's identity)
VOLATILE_ATTRS = ("created_at",)
#: value of an identity attribute that a store written before it existed is taken to have
IDENTITY_DEFAULTS: dict[str, Any] = {"amp": "fp32"}

#: version of the batch-directory format
PARTIAL_LAYOUT = 1
_RUN, _ATTRS, _FINAL, _TMP = "run.json", "attrs.json", "final.h5", ".tmp-"
_MAGIC = b"FSBATCH1"
_TAIL = struct.Struct("<32sQ8s")  # sha256 of the header, header length, magic
_ALIGN = 64  # the smallest block alignment (batch files of earlier versions)
#: where new batch files start and pad each layer block: direct reads and writes need whole 4 KiB
_BLOCK_ALIGN = rawio.DIRECT_ALIGN

# ---------------------------------------------------------------------------------------------
# Fault injection (tests): real kills at every step of the commit sequences
# ---------------------------------------------------------------------------------------------
#: ``FEATSTORE_FAULT_AT="batch:synced"`` (or ``"batch:synced:3"``, the 3rd time) makes this
#: process SIGKILL itself when it reaches that step
FAULT_ENV = "FEATSTORE_FAULT_AT"
#: every step, in the order one batch commit, one record write and the finishing step pass them
STEPS = (
    "create:dir", "create:renamed",
    "run:opened", "run:part", "run:synced", "run:renamed", "run:committed",
    "attrs:opened", "attrs:part", "attrs:synced", "attrs:renamed", "attrs:committed",
    "batch:opened", "batch:part", "batch:synced", "batch:renamed", "batch:committed",
    "final:items", "final:layer", "final:built", "final:replaced", "final:cleaned",
)
#: in-process hook called with each step's name (tests may raise from it)
fault_hook: Callable[[str], None] | None = None
_fault_counts: dict[str, int] = {}


def _step(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, nth = spec.rpartition(":") if spec.count(":") == 2 else (spec, "", "1")
    if want != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def layer_name(k: int) -> str:
    """Dataset name of layer ``k`` inside ``layers/`` (``00``, ``01``, ...)."""
    return f"{k:02d}"


def _default(kind: str) -> Any:
    return {"s": "", "i": -1, "f": np.nan}[kind]


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "OS":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


class StoreMismatch(RuntimeError):
    """A store or unfinished run belongs to other inputs or settings than this run.

    ``fields`` lists ``(name, theirs, ours)`` for every differing identity field.
    """

    def __init__(self, message: str, fields: Sequence[tuple[str, Any, Any]] = ()):
        super().__init__(message)
        self.fields = list(fields)


class PartialDamaged(RuntimeError):
    """An unfinished run's record cannot be read (its batch files may still be salvaged)."""


def partial_path(path: str | os.PathLike) -> Path:
    """The batch directory of an unfinished run of ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


# ---------------------------------------------------------------------------------------------
# Small durable-file helpers
# ---------------------------------------------------------------------------------------------
class _Enc(json.JSONEncoder):
    """JSON with numpy scalars/arrays kept typed (attributes must come back as they went in)."""

    def default(self, o: Any) -> Any:
        if isinstance(o, np.generic):
            return {"__np__": o.dtype.str, "v": o.item()}
        if isinstance(o, np.ndarray):
            return {"__nparray__": o.dtype.str, "v": o.tolist()}
        if isinstance(o, bytes):
            return o.decode("utf-8", "replace")
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        return super().default(o)


def _dec_hook(d: dict) -> Any:
    if "__np__" in d and len(d) == 2:
        return np.dtype(d["__np__"]).type(d["v"])
    if "__nparray__" in d and len(d) == 2:
        return np.asarray(d["v"], dtype=np.dtype(d["__nparray__"]))
    return d


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, cls=_Enc, sort_keys=True, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), object_hook=_dec_hook)


_write_all = rawio.write_all


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, parts: Iterable[Any], prefix: str, durable: bool) -> None:
    """Write ``parts`` to a temporary name, fsync, rename to ``path``, fsync the directory."""
    _write_then_finish(path, parts, prefix, durable)()


def _write_then_finish(path: Path, parts: Iterable[Any], prefix: str, durable: bool,
                       direct: bool = False) -> Callable[[], None]:
    """The first half of :func:`_atomic_write` (``parts`` to a temporary name; ``direct``: through a
    :class:`featstore.rawio.Sink`, past the page cache where possible); returns the second (fsync,
    rename to ``path``, fsync the directory), which must be called once, from any thread.
    Until it has run, nothing under ``path`` exists: a crash in between loses the file, whole."""
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = None
    try:
        _step(f"{prefix}:opened")
        # direct: the waits for the disk run in a write thread, and the last ones in finish()
        sink = rawio.Sink(fd, 0, direct=direct, background=direct)
        for part in parts:
            sink.write(part)
            _step(f"{prefix}:part")
        sink.close(wait=False)
    except BaseException:
        if sink is not None:
            sink.release()
        os.close(fd)
        raise

    def finish() -> None:
        try:
            sink.wait()  # an error of a background write is raised here
            if durable:
                os.fsync(fd)
        finally:
            sink.release()
            os.close(fd)
        _step(f"{prefix}:synced")
        os.replace(tmp, path)
        _step(f"{prefix}:renamed")
        if durable:
            _fsync_dir(path.parent)
        _step(f"{prefix}:committed")

    return finish


def _record_bytes(kind: str, obj: Any) -> bytes:
    body = _dumps(obj)
    return f"featstore-{kind} {PARTIAL_LAYOUT} {hashlib.sha256(body).hexdigest()}\n".encode() + body


def _read_record(path: Path, kind: str) -> Any:
    """Body of a checksummed record; ``ValueError`` naming what is wrong."""
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if not sep or len(parts) != 3 or parts[0] != f"featstore-{kind}":
        raise ValueError("not a featstore run record" if data else "empty file")
    if parts[1] != str(PARTIAL_LAYOUT):
        raise ValueError(f"record layout {parts[1]}, this featstore writes {PARTIAL_LAYOUT}")
    if hashlib.sha256(body).hexdigest() != parts[2]:
        raise ValueError("checksum mismatch")
    return _loads(body)


#: a layer block's checksum: CRC-32 (zlib, ~6 GB/s here, against 1.8 for sha256; each block is
#: summed when written and again when verified). It detects any burst error up to 32 bits and all
#: but 2**-32 of random damage (torn writes, truncation, bit rot); it does not resist tampering.
_CRC = "crc32:%08x"


def _scan_block(src: rawio.Source, off: int, nbytes: int, expected: str,
                on_piece: Callable[[memoryview], None] | None = None,
                stop: Any = None) -> bool:
    """Read one layer block piece by piece through a reused buffer and check it against its checksum
    (``crc32:`` or, files of earlier versions, sha256); ``on_piece`` gets each piece (the final file's
    copy), ``stop`` (an Event) ends the scan early with :class:`_BuildStopped`. Whether it matches."""
    check = _BlockCheck(expected)
    buf = rawio.take_buffer()
    view = memoryview(buf)
    try:
        done = 0
        while done < nbytes:
            if stop is not None and stop.is_set():
                raise _BuildStopped
            piece = src.read(view, off + done, min(len(view), nbytes - done))
            check.update(piece)
            if on_piece is not None:
                on_piece(piece)
            done += len(piece)
            piece.release()
    finally:
        view.release()
        rawio.give_buffer(buf)
    return check.ok()


class _BlockCheck:
    """A layer block's checksum computed piece by piece (``crc32:`` or, earlier versions, sha256)."""

    def __init__(self, expected: str):
        self.expected = expected
        self.crc = 0 if expected.startswith("crc32:") else None
        self.sha = None if self.crc is not None else hashlib.sha256()

    def update(self, data: Any) -> None:
        if self.sha is None:
            self.crc = zlib.crc32(data, self.crc)
        else:
            self.sha.update(data)

    def ok(self) -> bool:
        got = _CRC % self.crc if self.sha is None else self.sha.hexdigest()
        return got == self.expected


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pread(fd: int, offset: int, size: int) -> bytearray:
    buf = bytearray(size)
    rawio.read_into(fd, memoryview(buf), offset)
    return buf


# ---------------------------------------------------------------------------------------------
# Identity of a run or store
# ---------------------------------------------------------------------------------------------
def identity_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, have, want)`` for every key of ``want`` whose value differs in ``have``
    (attributes as stored; a key a store lacks counts as its :data:`IDENTITY_DEFAULTS` value)."""
    out = []
    for key, value in want.items():
        w = _norm(_attr(value))
        h = _norm(have[key]) if key in have else IDENTITY_DEFAULTS.get(key, None)
        if h != w:
            out.append((key, h, w))
    return out


def _compact(value: Any) -> Any:
    """A JSON list of integers as ranges (``"[0, 1, 2, 6]"`` -> ``0-2,6``), anything else unchanged."""
    if not (isinstance(value, str) and value.startswith("[")):
        return value
    try:
        ints = json.loads(value)
    except ValueError:
        return value
    if not ints or not all(isinstance(i, int) for i in ints):
        return value
    out, start = [], ints[0]
    for a, b in zip(ints, ints[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def describe_diff(fields: Sequence[tuple[str, Any, Any]], theirs: str, ours: str = "this run") -> str:
    """``layer_ids: the store [0, 1, 2], this run [0, 2]; manifest_sha256 (the manifest changed) ...``"""
    parts = []
    for key, h, w in fields:
        h, w = _compact(h), _compact(w)
        if key == "store":  # the file itself is unreadable
            parts.append(str(h))
        elif key == "manifest_sha256":
            parts.append(f"manifest_sha256 (the manifest's content changed: {_short(h, 12)} vs {_short(w, 12)})")
        elif key == "rows_digest":
            parts.append(f"rows_digest (the rows read from the manifest changed — segments from TextGrids, ids, "
                         f"labels, groups or paths: {_short(h, 12) if h else 'none recorded'} vs {_short(w, 12)})")
        elif h is None:
            parts.append(f"{key} ({theirs} has none, {ours} {_short(w, 40)})")
        elif str(h)[:1] in "[{" and (len(str(h)) > 40 or len(str(w)) > 40):
            parts.append(f"{key} (differs)")
        elif len(str(h)) > 40 or len(str(w)) > 40:  # paths, hashes: the end tells them apart
            parts.append(f"{key}: {theirs} ...{str(h)[-37:]}, {ours} ...{str(w)[-37:]}")
        else:
            parts.append(f"{key}: {theirs} {_short(h) or chr(39) * 2}, {ours} {_short(w) or chr(39) * 2}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    key: int
    path: Path
    header: dict


class _BuildStopped(Exception):
    """A background build was abandoned (:meth:`StoreWriter.abandon_build`)."""


class _DamagedBlock(Exception):
    """A layer block failed its checksum while the final file was built (``batch``: its batch)."""

    def __init__(self, batch: "_Batch"):
        super().__init__(batch.path.name)
        self.batch = batch


class StoreWriter:
    """Crash-safe incremental writer of one store (see the module docstring for the mechanism).

    ``create`` starts a run (one pending row per manifest row), ``resume`` reopens an unfinished
    one, :meth:`write_items` commits one batch atomically, :meth:`finalize` builds the HDF5 file
    and moves it into place. ``durable=False`` skips the per-batch fsyncs (for stores that are
    rebuilt from scratch anyway: merges, fakes); the finished file is always fsynced.
    """

    def __init__(self, path: Path, spec: dict, run_key: str, durable: bool):
        self.path = Path(path)
        self.dir = partial_path(self.path)
        self.spec = spec
        self.run_key = run_key
        self.durable = durable
        self.extra_attrs: dict[str, Any] = {}
        self.batches: dict[int, _Batch] = {}
        self._unfinished: int | None = None  # the batch written with finish_later, not yet finished
        self._build: tuple[threading.Thread, dict] | None = None  # build_in_background's thread, result
        self._build_stop = threading.Event()
        #: batch files found damaged (and deleted) when the run was opened: ``(name, reason)``
        self.dropped: list[tuple[str, str]] = []
        #: ``attrs.json`` was unreadable and ignored (its reason), or ``None``
        self.attrs_damaged: str | None = None
        self._done: dict[int, int] = {}
        self.dims = [int(d) for d in spec["layer_dims"]]
        self.dtype = np.dtype(spec["dtype"])

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
        *,
        plan: Sequence[Sequence[int]] | None = None,
        settings: Mapping[str, Any] | None = None,
        durable: bool = True,
        salvage: bool = False,
    ) -> "StoreWriter":
        """Start a run of ``path`` with one pending row per entry of ``rows``.

        ``layer_ids`` names the stored layers (model layer indices, default ``0..L-1``); ``plan``
        (e.g. the batches) and ``settings`` (e.g. the thread count) are kept in the run record
        for a resumed run to reuse; they are not attributes of the finished store. An existing
        unfinished run is discarded, except with ``salvage=True``: its record is rewritten and its
        batch files that belong to exactly this run (same rows, attributes, plan) are kept.
        """
        layer_ids = list(range(len(layer_dims))) if layer_ids is None else [int(k) for k in layer_ids]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = {
            "rows": [dict(r) for r in rows],
            "attrs": {str(k): _attr(v) for k, v in attrs.items()},
            "layer_dims": [int(d) for d in layer_dims],
            "layer_ids": layer_ids,
            "dtype": str(np.dtype(dtype)),
            "extra_columns": [str(c) for c in extra_columns],
            "chunk_frames": int(chunk_frames),
            "plan": [[int(j) for j in b] for b in plan] if plan is not None else None,
            "settings": dict(settings or {}),
        }
        # round-trip once so that the writer sees exactly what a resumed run will read
        spec = _loads(_dumps(spec))
        run_key = _run_key(spec)
        record = _record_bytes("run", {"run": run_key, "spec": spec})
        d = partial_path(path)
        for stray in path.parent.glob(f"{d.name}{_TMP}*"):
            _remove(stray)
        if salvage and d.is_dir() and not d.is_symlink():
            _atomic_write(d / _RUN, [record], "run", durable)
            writer = cls(path, spec, run_key, durable)
            writer._open_existing()
            return writer
        _remove(d)
        tmp = d.with_name(f"{d.name}{_TMP}{os.getpid()}")
        tmp.mkdir()
        _atomic_write(tmp / _RUN, [record], "run", durable)
        _step("create:dir")
        os.replace(tmp, d)
        if durable:
            _fsync_dir(d.parent)
        _step("create:renamed")
        return cls(path, spec, run_key, durable)

    @classmethod
    def resume(cls, path: str | os.PathLike, expect: Mapping[str, Any] | None = None, *,
               durable: bool = True) -> "StoreWriter":
        """Reopen the unfinished run of ``path``.

        Raises :class:`StoreMismatch` naming every attribute of ``expect`` that differs,
        :class:`PartialDamaged` when the run record cannot be read (then ``create(...,
        salvage=True)`` keeps what can be kept), ``FileNotFoundError`` when there is no run.
        Damaged batch files are deleted (listed in :attr:`dropped`), so their batches are redone.
        """
        path = Path(path)
        d = partial_path(path)
        if d.is_file() or (d.is_symlink() and not d.is_dir()):
            raise PartialDamaged(f"{d} is a single file: an unfinished run of an earlier featstore version, "
                                 "which cannot be resumed safely")
        if not d.is_dir():
            raise FileNotFoundError(f"no unfinished run at {d}")
        try:
            record = _read_record(d / _RUN, "run")
            spec, run_key = record["spec"], record["run"]
            if _run_key(spec) != run_key:
                raise ValueError("run key mismatch")
        except FileNotFoundError:
            raise PartialDamaged(f"{d} has no run record ({_RUN})") from None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise PartialDamaged(f"{d / _RUN} is damaged ({exc})") from None
        if expect:
            fields = identity_diff(spec["attrs"], {k: v for k, v in expect.items() if k not in VOLATILE_ATTRS})
            if fields:
                raise StoreMismatch(
                    f"{d} was started with other settings — {describe_diff(fields, 'there')}; delete it, "
                    "use --overwrite to discard it, or use another --out", fields)
        writer = cls(path, spec, run_key, durable)
        writer._open_existing()
        return writer

    def _open_existing(self) -> None:
        for f in self.dir.iterdir():
            if f.name.startswith(_TMP) or f.name == _FINAL:
                _remove(f)  # an interrupted commit or finish
        try:
            record = _read_record(self.dir / _ATTRS, "attrs")
            if record["run"] == self.run_key:
                self.extra_attrs = dict(record["attrs"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.attrs_damaged = str(exc)
            _remove(self.dir / _ATTRS)
        for f in sorted(self.dir.glob("b*.batch")):
            try:
                key, header = self._verify(f)
                if key in self.batches or any(int(r) in self._done for r in header["rows"]):
                    raise ValueError("its rows are already in another batch")
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
                self.dropped.append((f.name, str(exc)))
                _remove(f)
                continue
            self._add(key, f, header)

    def _add(self, key: int, path: Path, header: dict) -> None:
        self.batches[key] = _Batch(key, path, header)
        for r in header["rows"]:
            self._done[int(r)] = key

    # -- state -------------------------------------------------------------------------------
    @property
    def rows(self) -> list[dict]:
        return self.spec["rows"]

    @property
    def plan(self) -> list[list[int]] | None:
        return self.spec.get("plan")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.spec.get("settings") or {})

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as they will be written (values as stored: JSON strings for dicts)."""
        return {**self.spec["attrs"], **self.extra_attrs}

    def committed(self, key: int) -> bool:
        return key in self.batches

    def pending_rows(self) -> np.ndarray:
        """Indices of rows not yet in a committed batch."""
        return np.array([i for i in range(len(self.rows)) if i not in self._done], dtype=np.int64)

    # -- writing ---------------------------------------------------------------------------
    def write_items(self, results: Sequence[tuple[int, Mapping[str, Any], Sequence[np.ndarray] | None]],
                    key: int | None = None, stats: Mapping[str, Any] | None = None,
                    finish_later: bool = False) -> Any:
        """Commit a batch atomically: each entry is ``(row, fields, layers)``; returns its key.

        ``layers`` is a list with one ``(num_frames, dim_k)`` array per layer, or ``None`` for a
        failed item (0 frames). ``fields`` sets ``items/`` columns (status, error, note, ...).
        ``key`` orders the batches in the finished store (default: after the last one).
        ``finish_later``: checksum and write the batch file here, and return instead a function
        that finishes the commit (fsync, rename, directory fsync; it returns the key) and may be
        called from another thread: the wait for the disk can overlap other work. No other
        commit may begin before it has run.
        """
        if self._unfinished is not None:
            raise RuntimeError(f"the commit of batch {self._unfinished} is not finished")
        if self._build is not None:
            raise RuntimeError("the final file is being built: no batch can be committed now")
        key = max(self.batches, default=-1) + 1 if key is None else int(key)
        if key < 0 or key in self.batches:
            raise ValueError(f"batch {key} is already committed" if key >= 0 else "batch keys are >= 0")
        rows, fields, counts, arrays = [], [], [], []
        seen: set[int] = set()
        n_rows, n_layers = len(self.rows), len(self.dims)
        for row, values, frames in results:
            row = int(row)
            if not 0 <= row < n_rows:
                raise ValueError(f"row {row} does not exist (the run has {n_rows} rows)")
            if row in self._done or row in seen:
                raise ValueError(f"row {row} is already committed")
            seen.add(row)
            n = 0
            if frames is not None:
                if len(frames) != n_layers:
                    raise ValueError(f"row {row}: {len(frames)} layers given, the store has {n_layers}")
                n = int(frames[0].shape[0])
                for pos, f in enumerate(frames):
                    if f.ndim != 2 or f.shape != (n, self.dims[pos]):
                        raise ValueError(f"row {row}, layer {pos}: shape {f.shape}, expected ({n}, {self.dims[pos]})")
            rows.append(row)
            fields.append(dict(values))
            counts.append(n)
            arrays.append(frames if n else None)
        blocks: list[list[Any]] = []
        header: dict[str, Any] = {"layout": PARTIAL_LAYOUT, "run": self.run_key, "key": key, "rows": rows,
                                  "fields": fields, "frames": counts, "stats": dict(stats or {})}

        def parts() -> Iterator[Any]:
            pos_bytes = _BLOCK_ALIGN
            yield _MAGIC + b"\0" * (_BLOCK_ALIGN - len(_MAGIC))
            for pos in range(n_layers):  # one part (one writev) per layer block
                crc = 0
                start = pos_bytes
                block: list[Any] = []
                for fr in arrays:
                    if fr is None:
                        continue
                    a = np.ascontiguousarray(fr[pos], dtype=self.dtype)
                    crc = zlib.crc32(a, crc)
                    block.append(a)
                    pos_bytes += a.nbytes
                pad = -pos_bytes % _BLOCK_ALIGN
                if pad:
                    block.append(b"\0" * pad)
                if block:
                    yield block
                blocks.append([start, pos_bytes - start, _CRC % crc])
                pos_bytes += pad
            header["blocks"] = blocks
            header["data_end"] = pos_bytes
            body = _dumps(header)
            yield body + _TAIL.pack(hashlib.sha256(body).digest(), len(body), _MAGIC)

        name = self.dir / f"b{key:08d}.batch"
        finish = _write_then_finish(name, parts(), "batch", self.durable, direct=True)
        self._unfinished = key

        def done() -> int:
            try:
                finish()
                self._add(key, name, _loads(_dumps(header)))
            finally:
                self._unfinished = None
            return key

        return done if finish_later else done()

    def _verify(self, f: Path) -> tuple[int, dict]:
        """Check a batch file fully; its key and header, or ``ValueError`` saying what is wrong."""
        size = f.stat().st_size
        if size < _ALIGN + _TAIL.size:
            raise ValueError(f"truncated ({size} bytes)")
        fd = os.open(f, os.O_RDONLY)  # the header's small reads; the blocks through a Source (direct)
        src = None
        try:
            src = rawio.Source(f)
            if bytes(_pread(fd, 0, len(_MAGIC))) != _MAGIC:
                raise ValueError("not a batch file")
            digest, hlen, magic = _TAIL.unpack(bytes(_pread(fd, size - _TAIL.size, _TAIL.size)))
            if magic != _MAGIC or hlen > size - _TAIL.size - _ALIGN:
                raise ValueError("truncated or overwritten at its end")
            body = bytes(_pread(fd, size - _TAIL.size - hlen, hlen))
            if hashlib.sha256(body).digest() != digest:
                raise ValueError("header checksum mismatch")
            header = _loads(body)
            if header.get("layout") != PARTIAL_LAYOUT or header.get("run") != self.run_key:
                raise ValueError("written by another run")
            if header.get("data_end") != size - _TAIL.size - hlen:
                raise ValueError("its data and header do not fit together")
            key = int(header["key"])
            if f.name != f"b{key:08d}.batch":
                raise ValueError(f"holds batch {key}")
            rows, counts = header["rows"], header["frames"]
            if not (len(rows) == len(counts) == len(header["fields"])) or len(header["blocks"]) != len(self.dims):
                raise ValueError("inconsistent header")
            if any(not 0 <= int(r) < len(self.rows) for r in rows):
                raise ValueError("rows out of range")
            total = sum(int(c) for c in counts)
            for pos, (off, nbytes, sha) in enumerate(header["blocks"]):
                if nbytes != total * self.dims[pos] * self.dtype.itemsize or off + nbytes > header["data_end"]:
                    raise ValueError(f"layer block {pos} has the wrong size")
                if not _scan_block(src, off, nbytes, sha):
                    raise ValueError(f"checksum mismatch in layer block {pos}")
        finally:
            if src is not None:
                src.close()
            os.close(fd)
        return key, header

    def item_frames(self, row: int) -> list[np.ndarray] | None:
        """Row ``row``'s frames, one array per stored layer, as its committed batch holds them
        (read from the batch file, not verified: :meth:`finalize` verifies every block); ``None``
        when the row is not committed or has no frames (a failed item)."""
        key = self._done.get(int(row))
        if key is None:
            return None
        batch = self.batches[key]
        h = batch.header
        pos = [int(r) for r in h["rows"]].index(int(row))
        n, before = int(h["frames"][pos]), sum(int(c) for c in h["frames"][:pos])
        if not n:
            return None
        size = self.dtype.itemsize
        fd = os.open(batch.path, os.O_RDONLY)
        try:
            return [np.frombuffer(_pread(fd, int(off) + before * dim * size, n * dim * size), dtype=self.dtype)
                    .reshape(n, dim) for (off, _, _), dim in zip(h["blocks"], self.dims)]
        finally:
            os.close(fd)

    def set_attrs(self, **attrs: Any) -> None:
        """Set root attributes (kept in ``attrs.json`` until the store is finished)."""
        self.extra_attrs.update({k: _attr(v) for k, v in attrs.items()})
        self.extra_attrs = _loads(_dumps(self.extra_attrs))
        _atomic_write(self.dir / _ATTRS, [_record_bytes("attrs", {"run": self.run_key, "attrs": self.extra_attrs})],
                      "attrs", self.durable)

    # -- finishing -------------------------------------------------------------------------
    def item_columns(self) -> dict[str, np.ndarray]:
        """The ``items/`` table as the finished store will hold it (pending rows marked so)."""
        rows = self.rows
        cols: dict[str, list] = {}
        for col, kind in ITEM_COLUMNS.items():
            cols[col] = [r.get(col, _default(kind)) for r in rows]
        cols["status"] = [PENDING] * len(rows)
        for col in self.spec["extra_columns"]:
            cols[col] = [str(r.get(col, "") or "") for r in rows]
        total = 0
        for key in sorted(self.batches):
            h = self.batches[key].header
            for row, values, n in zip(h["rows"], h["fields"], h["frames"]):
                values = dict(values)
                values["offset"] = total if n else 0
                values["num_frames"] = int(n)
                values.setdefault("status", OK)
                for col, val in values.items():
                    if col in cols:
                        cols[col][int(row)] = "" if val is None else val
                total += int(n)
        out = {}
        for col, vals in cols.items():
            kind = ITEM_COLUMNS.get(col, "s")
            if kind == "s":
                out[col] = np.array([str(v) for v in vals], dtype=object)
            elif kind == "i":
                out[col] = np.asarray(vals, dtype=np.int64)
            else:
                out[col] = np.asarray(vals, dtype=np.float64)
        return out

    def build_in_background(self) -> None:
        """Start building ``<partial>/final.h5`` (``items/`` and every layer, no root attributes
        yet) in a thread, so that it overlaps other work (the padding audit computes while the
        layers are copied); :meth:`finalize` waits for it, and :meth:`abandon_build` stops it.
        Nothing may be committed meanwhile; :meth:`set_attrs` and :meth:`item_frames` may be used."""
        if self._build is not None:
            raise RuntimeError("a build is already running")
        self._build_stop.clear()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                self._build_file()
            except BaseException as exc:  # noqa: BLE001 - handed to finalize()
                box["error"] = exc

        thread = threading.Thread(target=run, name="featstore-build", daemon=True)
        self._build = (thread, box)
        thread.start()

    def abandon_build(self) -> None:
        """Stop a background build (if any) and wait for it; its file is rebuilt by :meth:`finalize`."""
        if self._build is None:
            return
        thread, _ = self._build
        self._build_stop.set()
        thread.join()
        self._build_stop.clear()  # a later build (or finalize) runs to its end
        self._build = None
        _remove(self.dir / _FINAL)

    def finalize(self) -> Path:
        """Build the HDF5 file from the committed batches and move it to the final name.

        The file is built as ``<partial>/final.h5`` (or was, by :meth:`build_in_background`: this
        waits for it and raises its error), gets its root attributes, is fsynced, and renamed over
        ``path`` with ``os.replace``: an existing store stays intact until that instant. Then the
        batch directory is removed. Raises :class:`PartialDamaged` (after deleting the batch) when
        a batch file was damaged after it was verified.
        """
        tmp = self.dir / _FINAL
        try:
            if self._build is not None:
                thread, box = self._build
                thread.join()
                self._build = None
                if "error" in box:
                    raise box["error"]
            else:
                self._build_file()
        except _DamagedBlock as exc:
            batch = exc.batch
            _remove(batch.path)
            del self.batches[batch.key]
            raise PartialDamaged(f"{batch.path.name} in {self.dir} was damaged after it was committed (checksum "
                                 "mismatch); it was deleted: run the same command again to redo that batch") from None
        try:
            with h5py.File(tmp, "r+") as h5:
                for k, v in {**self.attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                             "num_layers": len(self.dims), "dtype": str(self.dtype),
                             "num_items": len(self.rows)}.items():
                    h5.attrs[k] = v
            _fsync_file(tmp)
        except BaseException:
            _remove(tmp)
            raise
        _step("final:built")
        os.replace(tmp, self.path)
        _step("final:replaced")
        _fsync_dir(self.path.parent)
        self.discard()
        _step("final:cleaned")
        return self.path

    def _build_file(self) -> None:
        """``<partial>/final.h5`` with ``items/`` and every layer (root attributes: :meth:`finalize`).

        h5py writes ``items/`` and one contiguous dataset per layer, allocated at once (every object
        of 4 KiB or more at a 4 KiB-aligned offset); the layers' bytes are then copied from the batch
        files to those offsets through :class:`featstore.rawio.Sink` (direct writes), verified on
        the way."""
        cols = self.item_columns()
        keys = sorted(self.batches)
        tmp = self.dir / _FINAL
        _remove(tmp)
        spec = self.spec
        layer_ids, dims = spec["layer_ids"], self.dims
        total = int(cols["num_frames"].sum())
        try:
            with h5py.File(tmp, "w", alignment_threshold=rawio.DIRECT_ALIGN,
                           alignment_interval=rawio.DIRECT_ALIGN) as h5:
                items = h5.create_group("items")
                for col, values in cols.items():
                    if values.dtype == object:
                        items.create_dataset(col, data=values, dtype=STR)
                    else:
                        items.create_dataset(col, data=values)
                items.attrs["extra_columns"] = json.dumps(list(spec["extra_columns"]))
                layers = h5.create_group("layers")
                _step("final:items")
                places = []
                for lid, dim in zip(layer_ids, dims):
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # contiguous, its place fixed now
                    ds = layers.create_dataset(layer_name(lid), shape=(total, dim), dtype=self.dtype, dcpl=dcpl,
                                               fill_time="never")  # every byte is written below
                    places.append(ds.id.get_offset() if total else None)
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for pos, at in enumerate(places):
                    if at is not None:
                        sink = rawio.Sink(fd, at)
                        try:
                            written = sum(self._copy_block(self.batches[key], pos, sink) for key in keys)
                            sink.close()
                        except BaseException:
                            sink.release()
                            raise
                        if written != total:
                            raise RuntimeError(f"layer {pos}: {written} frames copied, {total} expected")
                    _step("final:layer")
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _remove(tmp)
            raise

    def _copy_block(self, batch: _Batch, pos: int, sink: rawio.Sink) -> int:
        """Copy layer block ``pos`` of ``batch`` to ``sink`` piece by piece, verifying its checksum;
        returns its frame count."""
        off, nbytes, sha = batch.header["blocks"][pos]
        if not nbytes:
            return 0
        src = rawio.Source(batch.path)
        try:
            ok = _scan_block(src, off, nbytes, sha, on_piece=sink.write, stop=self._build_stop)
        finally:
            src.close()
        if not ok:
            raise _DamagedBlock(batch)  # dropped by finalize(), in the caller's thread
        return nbytes // (self.dims[pos] * self.dtype.itemsize)

    def discard(self) -> None:
        """Delete the batch directory (see :func:`discard_partial`)."""
        discard_partial(self.path)

    def close(self) -> None:
        """Nothing stays open between commits; kept for callers of the earlier writer."""


def discard_partial(path: str | os.PathLike) -> None:
    """Delete the unfinished run of ``path``: batch files first, the run record last, so that a
    kill half-way leaves a directory that is still recognised as the run it was."""
    d = partial_path(path)
    if not d.is_dir() or d.is_symlink():
        _remove(d)
        return
    for f in d.iterdir():
        if f.name != _RUN:
            _remove(f)
    _remove(d / _RUN)
    _remove(d)


def _run_key(spec: Mapping[str, Any]) -> str:
    stable = {**spec, "attrs": {k: v for k, v in spec["attrs"].items() if k not in VOLATILE_ATTRS}}
    return hashlib.sha256(_dumps(stable)).hexdigest()[:32]


def read_partial_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """Root attributes recorded by the unfinished run of ``path``, or ``None`` when unreadable."""
    try:
        return dict(_read_record(partial_path(path) / _RUN, "run")["spec"]["attrs"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


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
        """Hash of the store's content identity: every root attribute (provenance, settings, the
        control / padding-recipe labels), the ``items/`` columns that place and label frames, each
        layer's shape and its first and last frame (computed once per open store; two reads per
        layer, whatever the store's size).

        Caches derived from the store (pooled vectors, sweep cells) are keyed by it; re-extracting a
        store changes ``created_at`` and therefore the identity. A legacy ``pooled/`` group in the
        file does not enter it.
        """
        if self._identity is None:
            import hashlib

            h = hashlib.sha256()
            h.update(json.dumps({k: str(_norm(v)) for k, v in self.h5.attrs.items()}, sort_keys=True).encode())
            for col in _IDENTITY_COLUMNS:
                if col in self.h5["items"]:
                    h.update(col.encode())
                    h.update("\x1f".join(map(str, self.column(col))).encode())
            for name in sorted(self.h5["layers"]):
                ds = self.h5["layers"][name]
                h.update(f"{name}:{ds.shape}:{ds.dtype}".encode())
                if ds.shape[0]:
                    h.update(np.ascontiguousarray(ds[0]).tobytes())
                    h.update(np.ascontiguousarray(ds[ds.shape[0] - 1]).tobytes())
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


def missing_store_message(path: str | Path) -> str:
    """What to tell a user whose store path does not exist: an unfinished run to resume, or nothing."""
    path = Path(path)
    if partial_path(path).exists():
        return (f"{path} is not finished: {partial_path(path)} holds an interrupted run; run the same "
                "`featstore extract` command again to resume it")
    return f"no store at {path}"


def open_store(path: str | os.PathLike, mode: str = "r", *, validate: bool = True) -> Store:
    """Open a finished store for reading (a finished store is immutable: readers use ``mode="r"``).

    Anything that is not a store of this format version — no file, a directory (an unfinished
    run's ``.partial``), a truncated or non-HDF5 file, another format or version, an ``items/``
    table that does not fit its ``layers/`` (with ``validate``, the default) — raises
    ``FileNotFoundError`` or ``ValueError`` with one line that names the file.
    ``featstore check`` (:func:`check_store`) lists every problem instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_store_message(path))
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a store file"
                         + (" (the batch directory of an unfinished run)" if path.name.endswith(".partial") else ""))
    try:
        h5 = h5py.File(path, mode)
    except OSError as exc:
        reason = str(exc).replace("Unable to synchronously open file", "").strip(" ()") or type(exc).__name__
        raise ValueError(f"{path} is not a readable featstore file: HDF5 cannot open it ({reason}); a truncated "
                         "or overwritten store has to be extracted again") from None
    try:
        if _norm(h5.attrs.get("format")) != FORMAT:
            raise ValueError(f"{path} is not a featstore file (root attribute format != 'featstore')")
        try:
            version = int(h5.attrs.get("format_version", -1))
        except (TypeError, ValueError):
            version = -1
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {h5.attrs.get('format_version')}; this featstore reads "
                             f"version {FORMAT_VERSION}")
        if validate:
            problem = _layout_problem(h5)
            if problem:
                raise ValueError(f"{path} is damaged: {problem}; `featstore check {path}` lists every problem")
    except ValueError:
        h5.close()
        raise
    except (OSError, KeyError, TypeError) as exc:  # a damaged object inside the file
        h5.close()
        raise ValueError(f"{path} is damaged: {exc}; `featstore check {path}` lists every problem") from None
    return Store(path, h5)


def _layout_problem(h5: h5py.File) -> str | None:
    """The first structural problem a reader would trip over (cheap: reads ``offset`` and
    ``num_frames`` only), or ``None``."""
    for group in ("items", "layers"):
        if not isinstance(h5.get(group), h5py.Group):
            return f"no {group}/ group"
    items, layers = h5["items"], h5["layers"]
    lengths = {}
    for name, ds in items.items():
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            return f"items/{name} is not a 1-D column"
        lengths[name] = ds.shape[0]
    for col in ("id", "path", "label", "group", "status", "error", "offset", "num_frames", "segment_start_frame",
                "segment_end_frame"):
        if col not in lengths:
            return f"no items/{col} column"
        kind = items[col].dtype.kind
        if ITEM_COLUMNS[col] == "i" and kind not in "iu":
            return f"items/{col} holds {items[col].dtype} values, not integers"
        if ITEM_COLUMNS[col] == "s" and kind not in "OSU":
            return f"items/{col} holds {items[col].dtype} values, not strings"
    n = lengths["id"]
    short = {k: v for k, v in lengths.items() if v != n}
    if short:
        k, v = next(iter(short.items()))
        return f"items/{k} has {v} rows but items/id has {n}"
    totals = {}
    for name, ds in layers.items():
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
            return f"layers/{name} is not a (frames, dim) array"
        try:
            int(name)
        except ValueError:
            return f"layers/{name} is not named by a layer number"
        totals[name] = ds.shape[0]
    if not totals:
        return "layers/ holds no layer"
    if len(set(totals.values())) > 1:
        return "layers have different frame totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(totals.items()))
    total = next(iter(totals.values()))
    offset, nfr = items["offset"][:], items["num_frames"][:]
    if (nfr < 0).any():
        return "negative items/num_frames"
    live = nfr > 0
    if ((offset[live] < 0) | (offset[live] + nfr[live] > total)).any():
        i = int(np.flatnonzero(live & ((offset < 0) | (offset + nfr > total)))[0])
        return f"item {i}'s frames [{int(offset[i])}, {int(offset[i] + nfr[i])}) reach outside the {total} frames of layers/"
    end = int((offset[live] + nfr[live]).max()) if live.any() else 0
    if end < total:  # (frames no item owns inside the arrays are harmless to readers; `check` lists them)
        return (f"its {len(nfr)} items own frames up to row {end} but layers/ holds {total}: the items table is "
                "shorter than its layers")
    return None


def check_store(path: str | os.PathLike) -> list[str]:
    """Verify the layout and invariants; return a list of problems (empty = valid)."""
    problems: list[str] = []
    try:
        store = open_store(path, validate=False)
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
        failed_with_frames = np.flatnonzero((status != OK) & (status != PENDING) & (nfr > 0))
        if len(failed_with_frames):
            problems.append(f"{len(failed_with_frames)} failed items have frames (first: row {failed_with_frames[0]})")
        ids = store.column("id")
        if len(set(ids[status == OK])) != int((status == OK).sum()):
            problems.append("duplicate ids among ok items")
        seg_s, seg_e = h5["items/segment_start_frame"][:], h5["items/segment_end_frame"][:]
        has = seg_s >= 0
        if ((seg_e[has] < seg_s[has]) | (seg_e[has] > nfr[has])).any():
            problems.append("a segment lies outside its item's frames")
        for name in h5["layers"]:
            problem = _nonfinite_report(h5["layers"][name], offset, nfr, ids)
            if problem:
                problems.append(f"layers/{name} {problem}")
    return problems


#: bytes of one read when scanning a layer (memory stays bounded whatever the store's size)
SCAN_BYTES = 32 << 20


def _nonfinite_report(ds: h5py.Dataset, offset: np.ndarray, nfr: np.ndarray, ids: np.ndarray) -> str | None:
    """Scan a whole layer in chunks of about :data:`SCAN_BYTES`; describe its non-finite values."""
    if not ds.shape[0] or ds.dtype.kind != "f":
        return None
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:])))
    step = max(1, SCAN_BYTES // row_bytes)
    if ds.chunks:
        step = max(ds.chunks[0], step // ds.chunks[0] * ds.chunks[0])
    count, bad_frames = 0, []
    for a in range(0, ds.shape[0], step):
        block = ds[a : a + step]
        finite = np.isfinite(block)
        if not finite.all():
            count += int(block.size - finite.sum())
            bad_frames.append(a + np.flatnonzero(~finite.reshape(len(block), -1).all(axis=1)))
    if not count:
        return None
    frames = np.concatenate(bad_frames)
    live = np.flatnonzero(nfr > 0)
    order = live[np.argsort(offset[live], kind="stable")]
    pos = np.searchsorted(offset[order], frames, side="right") - 1
    owners = sorted({int(order[p]) for p, fr in zip(pos, frames)
                     if p >= 0 and fr < offset[order[p]] + nfr[order[p]]})
    first = f"; first: item {ids[owners[0]]!r} (row {owners[0]})" if owners else ""
    return f"holds {count} non-finite values in {len(frames)} frames of {len(owners)} item(s){first}"


def compare_stores(a: str | os.PathLike, b: str | os.PathLike,
                   ignore_attrs: Sequence[str] = ("created_at", "extraction_stats")) -> list[str]:
    """Differences between two store files: every attribute (but ``ignore_attrs`` of the root),
    every dataset's dtype, shape and bytes; empty when they are equal item for item, bit for bit."""
    diffs: list[str] = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        def objects(f: h5py.File) -> dict[str, Any]:
            out = {"/": f}
            f.visititems(lambda name, obj: out.__setitem__(name, obj))
            return out

        oa, ob = objects(fa), objects(fb)
        for name in sorted(set(oa) ^ set(ob)):
            diffs.append(f"{name} only in {'the first' if name in oa else 'the second'}")
        for name in sorted(set(oa) & set(ob)):
            x, y = oa[name], ob[name]
            skip = ignore_attrs if name == "/" else ()
            for key in sorted((set(x.attrs) | set(y.attrs)) - set(skip)):
                if key not in x.attrs or key not in y.attrs:
                    diffs.append(f"{name} attribute {key} only in one store")
                elif not _same_value(x.attrs[key], y.attrs[key]):
                    diffs.append(f"{name} attribute {key}: {_short(x.attrs[key], 40)} vs {_short(y.attrs[key], 40)}")
            if isinstance(x, h5py.Dataset) and isinstance(y, h5py.Dataset):
                if x.dtype != y.dtype or x.shape != y.shape:
                    diffs.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
                    continue
                step = max(1, SCAN_BYTES // max(1, x.dtype.itemsize * int(np.prod(x.shape[1:] or (1,)))))
                for s0 in range(0, x.shape[0] if x.shape else 1, step):
                    u, v = (x[s0 : s0 + step], y[s0 : s0 + step]) if x.shape else (x[()], y[()])
                    if not _same_value(u, v):
                        diffs.append(f"{name} differs (from row {s0})")
                        break
    return diffs


def _same_value(u: Any, v: Any) -> bool:
    u, v = np.asarray(_norm(u)), np.asarray(_norm(v))
    if u.dtype.kind in "OSU" or v.dtype.kind in "OSU":
        return u.shape == v.shape and all(_norm(p) == _norm(q) for p, q in zip(u.ravel(), v.ravel()))
    return u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()

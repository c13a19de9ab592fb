"""The writer's raw file writes (featstore.rawio): the same bytes whatever path they take."""
from __future__ import annotations

import errno
import fcntl
import os

import h5py
import numpy as np
import pytest

from featstore import rawio
from featstore.store import StoreWriter, open_store

A = rawio.DIRECT_ALIGN


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(rawio, "STAGE_BYTES", 4 * A)  # many drains per test
    monkeypatch.setattr(rawio, "_pool", [])
    monkeypatch.setenv(rawio.DIRECT_ENV, "1")


def _parts(seed: int = 0) -> list:
    """Buffers of awkward sizes: empty, < one block, straddling the stage, a list of many."""
    rng = np.random.default_rng(seed)
    sizes = [0, 7, A - 7, A, 3 * A + 5, 9 * A + 123, 1]
    parts: list = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    parts.append([rng.standard_normal((3, 5)).astype(np.float32) for _ in range(700)])
    return parts


def _flat(parts) -> bytes:
    out = b""
    for p in parts:
        for q in p if isinstance(p, list) else [p]:
            out += bytes(memoryview(q).cast("B"))
    return out


def _direct_supported(path) -> bool:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        return rawio.set_direct(fd, True)
    finally:
        os.close(fd)
        os.remove(path)


def _write(path, parts, offset=0, prefix=b"", background=False):
    with open(path, "wb") as f:
        f.write(prefix)
    fd = os.open(path, os.O_WRONLY)
    try:
        sink = rawio.Sink(fd, offset, background=background)
        used = sink.direct
        for p in parts:
            sink.write(p)
        sink.close(wait=not background)
        if background:
            sink.wait()
        still_direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & rawio.O_DIRECT)
    finally:
        os.close(fd)
    return used, still_direct


@pytest.mark.parametrize("background", [False, True], ids=["inline", "write-thread"])
@pytest.mark.parametrize("offset", [0, 2 * A])
def test_sink_writes_the_same_bytes_direct(tmp_path, small_stage, offset, background):
    if not rawio.O_DIRECT or not _direct_supported(tmp_path / "probe"):
        pytest.skip("no O_DIRECT on this file system")
    parts = _parts()
    used, still = _write(tmp_path / "f", parts, offset, prefix=b"\xff" * offset, background=background)
    assert used and not still  # direct while writing, plain again once closed
    assert (tmp_path / "f").read_bytes() == b"\xff" * offset + _flat(parts)


def test_sink_is_plain_at_an_unaligned_offset_or_when_turned_off(tmp_path, small_stage, monkeypatch):
    parts = _parts(1)
    used, _ = _write(tmp_path / "u", parts, 10, prefix=b"0123456789")
    assert not used
    assert (tmp_path / "u").read_bytes() == b"0123456789" + _flat(parts)
    monkeypatch.setenv(rawio.DIRECT_ENV, "0")
    used, _ = _write(tmp_path / "o", parts)
    assert not used and (tmp_path / "o").read_bytes() == _flat(parts)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "write-thread"])
def test_sink_falls_back_when_direct_writes_are_refused(tmp_path, small_stage, monkeypatch, background):
    """A file system that takes the flag but refuses the write (EINVAL): the same bytes, plainly."""
    monkeypatch.setattr(rawio, "set_direct", lambda fd, on: True)
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if len(data) % A == 0 and not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    parts = _parts(2)
    _write(tmp_path / "f", parts, background=background)
    assert refused and (tmp_path / "f").read_bytes() == _flat(parts)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "write-thread"])
@pytest.mark.parametrize("short", [A, 5], ids=["aligned", "unaligned"])
def test_sink_finishes_short_direct_writes(tmp_path, small_stage, monkeypatch, short, background):
    monkeypatch.setattr(rawio, "set_direct", lambda fd, on: True)
    real = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(len(data))
        return real(fd, bytes(data)[:short], offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    parts = _parts(3)
    _write(tmp_path / "f", parts, background=background)
    assert max(calls) > short and (tmp_path / "f").read_bytes() == _flat(parts)


def test_other_errors_are_raised_and_the_buffer_comes_back(tmp_path, small_stage, monkeypatch):
    monkeypatch.setattr(rawio, "set_direct", lambda fd, on: True)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        sink = rawio.Sink(fd)
        with pytest.raises(OSError, match="No space"):
            sink.write(b"x" * (5 * A))
        sink.release()
    finally:
        os.close(fd)
    assert len(rawio._pool) == 1


def test_a_background_write_error_is_raised_by_wait_and_nothing_is_left_running(tmp_path, small_stage,
                                                                                  monkeypatch):
    import threading

    monkeypatch.setattr(rawio, "set_direct", lambda fd, on: True)
    real = os.pwrite
    writes = []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    taken = []
    real_take = rawio.take_buffer
    monkeypatch.setattr(rawio, "take_buffer", lambda: taken.append(real_take()) or taken[-1])
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        sink = rawio.Sink(fd, background=True)
        with pytest.raises(OSError, match="Input/output error"):  # raised by the next write or by wait()
            sink.write(b"x" * (13 * A))  # three full buffers handed to the write thread, one staged
            sink.close(wait=False)
            sink.wait()
        sink.release()
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name.startswith("featstore-write")]
    made = {id(b) for b in taken}  # (a buffer given back is taken again)
    assert len(taken) >= 3 and len(made) >= 2 and {id(b) for b in rawio._pool} == made  # every one came back


def test_finished_layers_are_contiguous_aligned_and_exact(tmp_path, small_stage):
    """The finished file's layers: contiguous datasets (of 4 KiB or more at 4 KiB-aligned offsets), written past h5py,
    the frames exactly as given (odd sizes, a failed item, blocks larger than the stage)."""
    rng = np.random.default_rng(0)
    dims = [3, 700]
    rows = [{"id": f"c{i}", "path": f"c{i}.wav"} for i in range(9)]
    w = StoreWriter.create(tmp_path / "s.h5", rows, {"encoder": "x"}, dims)
    want = {}
    for batch in ([0, 1, 2, 3], [4, 5], [6, 7, 8]):
        entries = []
        for i in batch:
            n = int(rng.integers(1, 40))
            frames = None if i == 5 else [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
            want[i] = frames
            entries.append((i, {}, frames))
        w.write_items(entries)
    path = w.finalize()
    with h5py.File(path) as h5:
        for k in ("layers/00", "layers/01"):
            ds = h5[k]
            assert ds.chunks is None  # contiguous
            if ds.nbytes >= A:  # smaller ones are not aligned (and written plainly)
                assert ds.id.get_offset() % A == 0, k
        assert h5["layers/01"].nbytes >= A
    with open_store(path) as s:
        for i, frames in want.items():
            for pos in range(2):
                got = s.frames(i, pos)
                if frames is None:
                    assert got.shape == (0, dims[pos])
                else:
                    np.testing.assert_array_equal(got, frames[pos])


def test_positioned_short_writes_are_retried_exactly(tmp_path, monkeypatch):
    """``pwritev``/``pwrite`` may write less than asked: the rest is written, at the right offsets."""
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: real_pwritev(fd, [bytes(bufs[0])[:3]], off))
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: real_pwrite(fd, bytes(b)[:5], off))
    parts = [np.arange(7, dtype=np.float32), b"", b"xy", np.arange(3, dtype=np.int64)]
    with open(tmp_path / "f", "wb") as f:
        f.write(b"-" * 20)
    fd = os.open(tmp_path / "f", os.O_WRONLY)
    try:
        assert rawio.write_all(fd, parts, 4) == len(_flat(parts))
        rawio.write_all(fd, b"single buffer", 4 + len(_flat(parts)))
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"----" + _flat(parts) + b"single buffer"


def test_source_reads_the_same_bytes_direct_plain_refused_or_short(tmp_path, small_stage, monkeypatch):
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 11 * A + 77, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    import mmap

    buf = mmap.mmap(-1, 12 * A)
    view = memoryview(buf)
    cases = [(0, 4 * A), (A, 3 * A - 5), (2 * A, 9 * A + 77), (100, 2 * A)]  # aligned, odd length, to EOF, unaligned

    def read_all(**kw):
        out = []
        for off, n in cases:
            src = rawio.Source(tmp_path / "f", **kw)
            try:
                out.append(bytes(src.read(view, off, n)))
            finally:
                src.close()
        return out

    want = [data[off : off + n] for off, n in cases]
    if rawio.O_DIRECT and _direct_supported(tmp_path / "probe"):
        src = rawio.Source(tmp_path / "f")
        assert src.direct
        src.close()
    assert read_all() == want
    assert read_all(direct=False) == want
    monkeypatch.setattr(rawio, "set_direct", lambda fd, on: True)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:A]], off))  # short, aligned
    assert read_all() == want
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:7]], off))  # short, unaligned
    assert read_all() == want

    state, refusals = {}, []

    def set_direct(fd, on):
        state[fd] = on
        return True

    def refused(fd, bufs, off):  # the flag is taken, direct reads are not (EINVAL)
        if state.get(fd):
            refusals.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(rawio, "set_direct", set_direct)
    monkeypatch.setattr(os, "preadv", refused)
    assert read_all() == want and len(refusals) == 3  # the three aligned cases
    with pytest.raises(ValueError, match="file ends after"):
        rawio.Source(tmp_path / "f").read(view, 10 * A, 2 * A)
    view.release()


def test_batch_files_of_earlier_versions_64_byte_blocks_still_finish(tmp_path, monkeypatch):
    """Batch files written before the 4 KiB block alignment (blocks at 64-byte offsets) are read
    back plainly and give the same store."""
    from featstore import store as st

    def build(out, align):
        with monkeypatch.context() as m:
            m.setattr(st, "_BLOCK_ALIGN", align)
            rng = np.random.default_rng(0)
            rows = [{"id": f"c{i}", "path": f"c{i}.wav"} for i in range(6)]
            w = StoreWriter.create(out, rows, {"encoder": "x"}, [5, 1100])
            for batch in ([0, 1, 2], [3, 4, 5]):
                w.write_items([(i, {}, [rng.standard_normal((7 + i, d)).astype(np.float32) for d in (5, 1100)])
                               for i in batch])
            offsets = [blk[0] for b in w.batches.values() for blk in b.header["blocks"]]
        return w, offsets

    old, offsets = build(tmp_path / "old.h5", 64)
    assert offsets[0] == 64 and any(o % A for o in offsets)
    old = StoreWriter.resume(tmp_path / "old.h5")
    old.finalize()
    new, offsets = build(tmp_path / "new.h5", st._BLOCK_ALIGN)
    assert all(o % A == 0 for o in offsets)
    new.finalize()
    assert st.compare_stores(tmp_path / "old.h5", tmp_path / "new.h5", ignore_attrs=("created_at",)) == []


def test_platforms_without_preadv_and_pwritev_write_and_read_the_same_bytes(tmp_path, small_stage, monkeypatch):
    """macOS has neither ``os.preadv`` nor ``os.pwritev`` (nor ``O_DIRECT``): the plain paths and a
    whole store still work there."""
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pwritev", raising=False)
    monkeypatch.setattr(rawio, "O_DIRECT", 0)
    parts = [q for p in _parts(5) for q in (p if isinstance(p, list) else [p])]
    with open(tmp_path / "f", "wb") as f:
        f.write(b"--")
    fd = os.open(tmp_path / "f", os.O_WRONLY)
    try:
        rawio.write_all(fd, parts, 2)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"--" + _flat(parts)
    import mmap

    view = memoryview(mmap.mmap(-1, 2 * A))
    src = rawio.Source(tmp_path / "f")
    assert not src.direct and bytes(src.read(view, 2, A + 3)) == _flat(parts)[: A + 3]
    src.close()
    rng = np.random.default_rng(1)
    rows = [{"id": f"c{i}", "path": f"c{i}.wav"} for i in range(4)]
    w = StoreWriter.create(tmp_path / "s.h5", rows, {"encoder": "x"}, [700])
    frames = {i: rng.standard_normal((5 + i, 700)).astype(np.float32) for i in range(4)}
    w.write_items([(i, {}, [frames[i]]) for i in (0, 1)])
    w.write_items([(i, {}, [frames[i]]) for i in (2, 3)])
    w = StoreWriter.resume(tmp_path / "s.h5")  # verifies the batch files by reading them back
    w.finalize()
    with open_store(tmp_path / "s.h5") as s:
        for i in range(4):
            np.testing.assert_array_equal(s.frames(i, 0), frames[i])

"""Crash safety of the store writer: real kills (SIGKILL) at every step of every commit sequence,
a second kill of the resumed run, interruptions at every I/O call of a batch commit, damaged
batch directories, the one-writer lock, a full scan for non-finite frames."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest

from featstore import store as st
from featstore.store import PartialDamaged, StoreWriter, check_store, compare_stores, partial_path
from featstore.writelock import LockBusy, WriterLock, lock_path

# ---------------------------------------------------------------------------------------------
# A small deterministic store, written the way `featstore extract` writes: resume the unfinished
# run when there is one, commit the missing batches of the recorded plan, finish.
# ---------------------------------------------------------------------------------------------
N_ROWS, DIMS = 10, (3, 5)
PLAN = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]


def _data():
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i}", "path": f"{i}.wav", "label": "ab"[i % 2], "group": f"g{i % 3}", "sex": "FM"[i % 2]}
            for i in range(N_ROWS)]
    frames = [[rng.normal(size=(i + 1, d)).astype(np.float32) for d in DIMS] for i in range(N_ROWS)]
    attrs = {"encoder": "driver", "encoder_revision": "", "encoder_config": {"a": 1}, "sample_rate": 16000,
             "frame_stride_samples": 320, "receptive_field_samples": 400, "first_frame_center_samples": 199.5,
             "manifest_sha256": "", "padding_exact": True, "padding_audit": {}, "versions": {},
             "created_at": str(time.time())}
    return rows, frames, attrs


def _entries(batch, frames):
    """One batch's entries as :func:`write_store` commits them (row 4 failed)."""
    return [(j, {"status": "too_short", "error": "short"} if j == 4 else {"note": f"n{j}"},
             None if j == 4 else frames[j]) for j in batch]


def write_store(out: Path, split: bool = False) -> int:
    """Write (or resume) the small store; returns the number of batches this call committed.
    ``split``: each commit as `featstore extract` makes it on the CPU, written here and finished
    (fsync, rename) in another thread."""
    rows, frames, attrs = _data()
    if out.exists():
        st.discard_partial(out)
        return 0
    try:
        w = StoreWriter.resume(out, expect={"encoder": "driver"})
    except FileNotFoundError:
        w = StoreWriter.create(out, rows, attrs, DIMS, extra_columns=["sex"], plan=PLAN)
    except PartialDamaged:
        w = StoreWriter.create(out, rows, attrs, DIMS, extra_columns=["sex"], plan=PLAN, salvage=True)
    if "audit" not in w.extra_attrs:
        w.set_attrs(audit={"clips": 2})
    wrote = 0
    for key, batch in enumerate(w.plan):
        if not w.committed(key):
            done = w.write_items(_entries(batch, frames), key=key, finish_later=split)
            if split:
                t = threading.Thread(target=done)
                t.start()
                t.join()
            wrote += 1
    w.finalize()
    return wrote


def in_child(fn, *args, env: dict | None = None) -> tuple[int, object]:
    """Run ``fn(*args)`` in a forked child (a real process: SIGKILL kills it); returns
    ``(signal or -exit status, value)``."""
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            os.environ.update(env or {})
            st._fault_counts.clear()
            value = fn(*args)
            os.write(wfd, json.dumps(value).encode())
        except BaseException:  # noqa: BLE001
            os.write(wfd, json.dumps("error: " + traceback.format_exc()).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    value = json.loads(b"".join(chunks)) if chunks else None
    return (os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)), value


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    assert in_child(write_store, out) == (0, len(PLAN))
    return out


def committed_files(out: Path) -> int:
    d = partial_path(out)
    return len(list(d.glob("b*.batch"))) if d.is_dir() else 0


# every step each sequence passes (occurrence 1), and the second batch's steps
KILL_POINTS = [(s, 1) for s in st.STEPS] + [(s, 2) for s in st.STEPS if s.startswith("batch:")] + [("batch:part", 7)]


@pytest.mark.parametrize("step, nth", KILL_POINTS, ids=[f"{s}#{n}" for s, n in KILL_POINTS])
def test_kill_at_every_step_then_resume_is_identical(reference, tmp_path, step, nth):
    out = tmp_path / "s.h5"
    sig, _ = in_child(write_store, out, env={st.FAULT_ENV: f"{step}:{nth}"})
    assert sig == signal.SIGKILL, f"not killed at {step}#{nth}"
    committed = committed_files(out)
    sig, wrote = in_child(write_store, out)
    assert sig == 0, wrote
    assert not partial_path(out).exists()
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []
    assert check_store(out) == []
    # committed work is not redone: only the batches missing at the kill were written again
    if not step.startswith("final:"):
        assert wrote == len(PLAN) - committed


SPLIT_POINTS = [(s, n) for s in st.STEPS if s.startswith("batch:") for n in (1, 2)]


@pytest.mark.parametrize("step, nth", SPLIT_POINTS, ids=[f"{s}#{n}" for s, n in SPLIT_POINTS])
def test_kill_at_every_step_of_a_commit_finished_in_another_thread(reference, tmp_path, step, nth):
    out = tmp_path / "s.h5"
    sig, _ = in_child(write_store, out, True, env={st.FAULT_ENV: f"{step}:{nth}"})
    assert sig == signal.SIGKILL, f"not killed at {step}#{nth}"
    committed = committed_files(out)
    if step != "batch:part":  # (several parts a batch)
        assert committed == nth - 1 + (step in ("batch:renamed", "batch:committed"))
    sig, wrote = in_child(write_store, out, True)
    assert sig == 0, wrote
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []
    assert check_store(out) == [] and wrote == len(PLAN) - committed


def test_a_commit_finished_later_is_invisible_until_finished(tmp_path):
    rows, frames, attrs = _data()
    out = tmp_path / "s.h5"
    w = StoreWriter.create(out, rows, attrs, DIMS, extra_columns=["sex"], plan=PLAN)
    finish = w.write_items([(j, {}, frames[j]) for j in PLAN[0]], key=0, finish_later=True)
    assert not w.committed(0) and committed_files(out) == 0
    with pytest.raises(RuntimeError, match="the commit of batch 0 is not finished"):
        w.write_items([(j, {}, frames[j]) for j in PLAN[1]], key=1)
    assert finish() == 0
    assert w.committed(0) and committed_files(out) == 1
    assert w.write_items([(j, {}, frames[j]) for j in PLAN[1]], key=1) == 1


@pytest.mark.parametrize("first, second", [("batch:synced:2", "batch:renamed:1"), ("batch:committed:1", "final:layer:1"),
                                           ("create:renamed:1", "attrs:renamed:1"), ("run:part:1", "run:synced:1"), ("final:items:1", "final:replaced:1")])
def test_second_kill_of_the_resumed_run(reference, tmp_path, first, second):
    out = tmp_path / "s.h5"
    for fault in (first, second):
        sig, _ = in_child(write_store, out, env={st.FAULT_ENV: fault})
        assert sig == signal.SIGKILL
    sig, msg = in_child(write_store, out)
    assert sig == 0, msg
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []
    assert not partial_path(out).exists()


def _damage(out: Path, how: str) -> None:
    d = partial_path(out)
    batches = sorted(d.glob("b*.batch"))
    if how == "truncate-batch":
        with open(batches[1], "r+b") as f:
            f.truncate(os.path.getsize(batches[1]) // 2)
    elif how == "flip-frames":
        with open(batches[0], "r+b") as f:
            f.seek(st._BLOCK_ALIGN + 6)  # inside the first layer block
            b = f.read(1)
            f.seek(st._BLOCK_ALIGN + 6)  # inside the first layer block
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "flip-header":
        size = os.path.getsize(batches[0])
        with open(batches[0], "r+b") as f:
            f.seek(size - 60)
            b = f.read(1)
            f.seek(size - 60)
            f.write(bytes([b[0] ^ 0x01]))
    elif how == "garbage-batch":
        (d / "b00000003.batch").write_bytes(b"\0" * 500)
    elif how == "flip-record":
        data = bytearray((d / "run.json").read_bytes())
        data[len(data) // 2] ^= 0x20
        (d / "run.json").write_bytes(bytes(data))
    elif how == "truncate-record":
        (d / "run.json").write_bytes((d / "run.json").read_bytes()[:40])
    elif how == "no-record":
        (d / "run.json").unlink()
    elif how == "damaged-attrs":
        (d / "attrs.json").write_bytes(b"featstore-attrs 1 00\n{}")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how, kept", [("truncate-batch", 1), ("flip-frames", 1), ("flip-header", 1), ("garbage-batch", 2),
                                       ("flip-record", 2), ("truncate-record", 2), ("no-record", 2), ("damaged-attrs", 2)])
def test_damaged_batch_directory_is_salvaged(reference, tmp_path, how, kept):
    out = tmp_path / "s.h5"
    assert in_child(write_store, out, env={st.FAULT_ENV: "batch:opened:3"})[0] == signal.SIGKILL
    assert committed_files(out) == 2
    _damage(out, how)
    sig, wrote = in_child(write_store, out)
    assert sig == 0, wrote
    assert wrote == len(PLAN) - kept
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []


def test_resume_reports_what_it_dropped(tmp_path):
    out = tmp_path / "s.h5"
    in_child(write_store, out, env={st.FAULT_ENV: "batch:opened:3"})
    _damage(out, "flip-frames")
    w = StoreWriter.resume(out)
    assert sorted(w.batches) == [1] and w.dropped == [("b00000000.batch", "checksum mismatch in layer block 0")]
    _damage(out, "no-record")
    with pytest.raises(PartialDamaged, match=r"s\.h5\.partial has no run record \(run\.json\)"):
        StoreWriter.resume(out)


def test_old_format_partial_file_is_replaced(reference, tmp_path):
    out = tmp_path / "s.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 .partial of the earlier writer
    with pytest.raises(PartialDamaged, match="single file: an unfinished run of an earlier featstore version"):
        StoreWriter.resume(out)
    assert in_child(write_store, out) == (0, len(PLAN))
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []


def test_a_batch_damaged_after_verification_is_caught_when_finishing(tmp_path):
    out = tmp_path / "s.h5"
    rows, frames, attrs = _data()
    w = StoreWriter.create(out, rows, attrs, DIMS, plan=PLAN)
    for key, batch in enumerate(PLAN):
        w.write_items([(j, {}, frames[j]) for j in batch], key=key)
    data = bytearray(w.batches[2].path.read_bytes())
    data[st._BLOCK_ALIGN] ^= 0xFF  # the first layer block
    w.batches[2].path.write_bytes(bytes(data))
    with pytest.raises(PartialDamaged, match="b00000002.batch .* was damaged after it was committed"):
        w.finalize()
    assert not out.exists() and sorted(w.batches) == [0, 1, 3] and not (partial_path(out) / "final.h5").exists()


def _as_sha256_batch(f: Path) -> None:
    """Rewrite a batch file as earlier versions wrote it: a sha256 per layer block."""
    import hashlib

    data = f.read_bytes()
    digest, hlen, magic = st._TAIL.unpack(data[-st._TAIL.size:])
    header = st._loads(data[len(data) - st._TAIL.size - hlen: len(data) - st._TAIL.size])
    for block in header["blocks"]:
        off, nbytes, crc = block
        assert crc.startswith("crc32:")
        block[2] = hashlib.sha256(data[off: off + nbytes]).hexdigest()
    body = st._dumps(header)
    f.write_bytes(data[: header["data_end"]] + body + st._TAIL.pack(hashlib.sha256(body).digest(), len(body), magic))


@pytest.mark.parametrize("damage", [False, True])
def test_batches_of_earlier_versions_sha256_blocks_still_resume(reference, tmp_path, damage):
    out = tmp_path / "s.h5"
    rows, frames, attrs = _data()
    w = StoreWriter.create(out, rows, attrs, DIMS, extra_columns=["sex"], plan=PLAN)
    w.set_attrs(audit={"clips": 2})
    for key, batch in enumerate(PLAN[:2]):
        w.write_items(_entries(batch, frames), key=key)
    for key in (0, 1):
        _as_sha256_batch(w.batches[key].path)
    if damage:  # one byte of batch 1's frames: its sha256 no longer matches
        data = bytearray(w.batches[1].path.read_bytes())
        data[st._BLOCK_ALIGN] ^= 0xFF  # the first layer block
        w.batches[1].path.write_bytes(bytes(data))
    w2 = StoreWriter.resume(out)
    assert sorted(w2.batches) == ([0] if damage else [0, 1])
    assert [name for name, _ in w2.dropped] == (["b00000001.batch"] if damage else [])
    assert write_store(out) == (3 if damage else 2)
    assert compare_stores(reference, out, ignore_attrs=("created_at",)) == []


def test_write_items_refuses_bad_entries(tmp_path):
    rows, frames, attrs = _data()
    w = StoreWriter.create(tmp_path / "s.h5", rows, attrs, DIMS)
    w.write_items([(0, {}, frames[0])], key=0)
    with pytest.raises(ValueError, match="row 0 is already committed"):
        w.write_items([(0, {}, frames[0])])
    with pytest.raises(ValueError, match="batch 0 is already committed"):
        w.write_items([(1, {}, frames[1])], key=0)
    with pytest.raises(ValueError, match=r"row 1, layer 1: shape \(2, 4\), expected \(2, 5\)"):
        w.write_items([(1, {}, [frames[1][0], np.zeros((2, 4), np.float32)])])
    assert list(w.pending_rows()) == list(range(1, N_ROWS))


# ---------------------------------------------------------------------------------------------
# The one-writer lock
# ---------------------------------------------------------------------------------------------
def test_second_writer_is_refused_and_lock_released(tmp_path):
    out = tmp_path / "s.h5"
    with WriterLock(out):
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(LockBusy, match=rf"s\.h5 is being written by pid {os.getpid()} on host "):
            WriterLock(out).acquire()
        # another process is refused too
        sig, msg = in_child(lambda: WriterLock(out).acquire() and "acquired")
        assert sig == -1 and "is being written by pid" in msg
    assert not lock_path(out).exists()
    with WriterLock(out) as again:
        assert again.note is None


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    out = tmp_path / "s.h5"

    def hold_and_die():
        WriterLock(out).acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    assert in_child(hold_and_die)[0] == signal.SIGKILL
    dead = json.loads(lock_path(out).read_text())["pid"]
    with WriterLock(out) as lock:
        assert lock.note.startswith(f"took over the stale lock s.h5.lock of pid {dead} on host {socket.gethostname()}")
        assert lock.note.endswith("(no longer running)")
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_lock_written_by_another_host_is_respected(tmp_path):
    out = tmp_path / "s.h5"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(LockBusy, match=r"pid 1 on host node-17, started 2024-01-01T00:00:00\+00:00 \(lock .*s\.h5\.lock, refreshed \d+ s ago\); wait for that run to finish\. If no featstore run is active on node-17, delete"):
        WriterLock(out).acquire()
    old = time.time() - 3600
    os.utime(lock_path(out), (old, old))
    with WriterLock(out) as lock:
        assert "node-17" in lock.note and "untouched for 60 min" in lock.note


def test_lock_without_flock_support(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "s.h5"
    with WriterLock(out):
        with pytest.raises(LockBusy, match="is being written by pid"):
            WriterLock(out).acquire()
    assert not lock_path(out).exists()
    lock_path(out).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "x"}))
    with WriterLock(out) as lock:
        assert "took over the stale lock" in lock.note


# ---------------------------------------------------------------------------------------------
# check scans whole layers
# ---------------------------------------------------------------------------------------------
def test_check_finds_nonfinite_frames_anywhere_in_a_layer(tmp_path, monkeypatch):
    n = 70_000  # beyond the first 65,536 frames
    x = np.zeros((n, 2), np.float32)
    x[69_000, 1] = np.nan
    x[69_001, 0] = np.inf
    rows = [{"id": "a"}, {"id": "b"}]
    w = StoreWriter.create(tmp_path / "s.h5", rows, _data()[2], [2])
    w.write_items([(0, {}, [np.zeros((5, 2), np.float32)]), (1, {}, [x])])
    path = w.finalize()
    monkeypatch.setattr(st, "SCAN_BYTES", 4096)  # many chunks, bounded memory
    assert check_store(path) == ["layers/00 holds 2 non-finite values in 2 frames of 1 item(s); first: item 'b' (row 1)"]


def test_short_writes_are_retried_exactly(tmp_path, monkeypatch):
    """``writev``/``write`` may write less than asked (signals, quotas): the rest is written, in order."""
    real_write, real_writev = os.write, os.writev
    calls = []

    def short_writev(fd, bufs):
        calls.append(len(bufs))
        first = bytes(bufs[0])[:3]  # a part of the first buffer only (3 bytes, or fewer)
        return real_writev(fd, [first]) if first else 0

    monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(os, "write", lambda fd, b: real_write(fd, bytes(b)[:5]))
    parts = [np.arange(7, dtype=np.float32), b"", b"xy", np.arange(3, dtype=np.int64)]
    want = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        st._write_all(fd, parts)
        st._write_all(fd, b"single buffer")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == want + b"single buffer"
    assert calls and max(calls) == 3  # the empty buffer is skipped


def _committed_writer(out: Path) -> StoreWriter:
    rows, frames, attrs = _data()
    w = StoreWriter.create(out, rows, attrs, DIMS, extra_columns=["sex"], plan=PLAN)
    for key, batch in enumerate(PLAN):
        w.write_items(_entries(batch, frames), key=key)
    return w


def test_a_background_build_gives_the_same_store_and_takes_later_attributes(tmp_path):
    """build_in_background() then finalize() == finalize() alone; attributes set while the build
    runs are in the store; no batch can be committed meanwhile; the thread is gone afterwards."""
    plain = _committed_writer(tmp_path / "a.h5")
    plain.set_attrs(padding_audit={"clips": 3})
    plain.finalize()
    w = _committed_writer(tmp_path / "b.h5")
    w.build_in_background()
    with pytest.raises(RuntimeError, match="being built: no batch can be committed now"):
        w.write_items([], key=99)
    w.set_attrs(padding_audit={"clips": 3})
    w.finalize()
    assert not [t for t in threading.enumerate() if t.name == "featstore-build"]
    assert compare_stores(tmp_path / "a.h5", tmp_path / "b.h5", ignore_attrs=("created_at",)) == []
    with h5py.File(tmp_path / "b.h5") as h5:
        assert json.loads(h5.attrs["padding_audit"]) == {"clips": 3}


def test_a_damaged_batch_found_by_a_background_build_is_dropped_in_the_callers_thread(tmp_path):
    out = tmp_path / "s.h5"
    w = _committed_writer(out)
    data = bytearray(w.batches[2].path.read_bytes())
    data[st._BLOCK_ALIGN] ^= 0xFF  # the first layer block
    w.batches[2].path.write_bytes(bytes(data))
    w.build_in_background()
    with pytest.raises(PartialDamaged, match="b00000002.batch .* was damaged after it was committed"):
        w.finalize()
    assert not out.exists() and sorted(w.batches) == [0, 1, 3] and not (partial_path(out) / "final.h5").exists()


def test_an_abandoned_build_stops_and_leaves_the_run_resumable(tmp_path, monkeypatch):
    """abandon_build() (an error or a stop while the build runs) ends the thread mid-copy and
    removes its file; the run then finishes to the same store."""
    out = tmp_path / "s.h5"
    w = _committed_writer(out)
    started, release, steps = threading.Event(), threading.Event(), []

    def hook(step):
        steps.append(step)
        if step == "final:items":  # the file exists, no layer copied yet
            started.set()
            release.wait(10)

    monkeypatch.setattr(st, "fault_hook", hook)
    w.build_in_background()
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()  # the build goes on once abandon_build() has asked it to stop
    w.abandon_build()
    assert steps == ["final:items"]  # stopped before the first layer was copied
    assert not [t for t in threading.enumerate() if t.name == "featstore-build"]
    assert not (partial_path(out) / "final.h5").exists() and not out.exists()
    monkeypatch.setattr(st, "fault_hook", None)
    w.set_attrs(audit={"clips": 2})  # as write_store() sets it
    w.finalize()  # the same writer finishes after all
    ref = tmp_path / "ref.h5"
    write_store(ref)
    assert compare_stores(ref, out, ignore_attrs=("created_at",)) == []

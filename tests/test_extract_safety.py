"""`featstore extract` after crashes and with changed inputs: interruptions at every I/O call of a
batch commit, real kills of the command (twice), SIGTERM, damaged unfinished runs, stale stores,
--overwrite, a second writer, reserved column names, non-finite frames, exit codes, the predict
cache."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import featstore
import featstore.extract as fx
from featstore_cli.featstore_app import app
from featstore.extract import extract
from featstore.store import partial_path
from tests.conftest import write_manifest, write_wav

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
N_CLIPS = 8
BATCH_SECONDS = 0.3  # -> several batches


def assert_same_store(a: Path, b: Path) -> None:
    """Item for item, frame for frame (bit for bit), through the public reader."""
    with featstore.open(a) as x, featstore.open(b) as y:
        assert x.items.equals(y.items)
        assert x.layer_ids == y.layer_ids
        for i in range(x.num_items):
            for k in x.layer_ids:
                assert x.frames(i, k).tobytes() == y.frames(i, k).tobytes(), (i, k)
        for key in ("padding_audit", "layer_ids", "manifest_sha256", "encoder_revision"):
            assert x.attrs.get(key) == y.attrs.get(key), key


@pytest.fixture(scope="module")
def wavlm(tiny_models) -> str:
    return str(tiny_models["wavlm"])


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    """8 short clips (0.08-0.25 s), 3 labels, 4 speakers, listed with absolute paths."""
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(N_CLIPS):
        x = (0.1 * rng.normal(size=int(rng.integers(1280, 4000)))).astype(np.float32)
        p = write_wav(d / f"c{i:02d}.wav", x)
        rows.append({"path": str(p), "label": "abc"[i % 3], "speaker": f"s{i % 4}", "sex": "FM"[i % 2]})
    write_manifest(d / "clips.csv", rows)
    return d


@pytest.fixture()
def clip_set(clips_dir, tmp_path) -> Path:
    """A private copy of the manifest (tests edit it)."""
    man = tmp_path / "clips.csv"
    man.write_bytes((clips_dir / "clips.csv").read_bytes())
    return man


@pytest.fixture(scope="module")
def reference(wavlm, clips_dir) -> Path:
    """An uninterrupted run without the padding audit (the tests below pass audit_clips=0)."""
    return extract(clips_dir / "clips.csv", wavlm, clips_dir / "ref.h5", batch_seconds=BATCH_SECONDS, progress=False,
                   audit_clips=0).path


@pytest.fixture(scope="module")
def audited_reference(wavlm, clips_dir) -> Path:
    """An uninterrupted run with the command's defaults (padding audit of 8 clips)."""
    return extract(clips_dir / "clips.csv", wavlm, clips_dir / "ref-audit.h5", batch_seconds=BATCH_SECONDS,
                   progress=False).path


def quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=300, soft_wrap=True), buf


# ---------------------------------------------------------------------------------------------
# Interruptions inside the commit window
# ---------------------------------------------------------------------------------------------
IO_CALLS = [("os", "write"), ("os", "writev"), ("os", "pwrite"), ("os", "pwritev"), ("os", "fsync"), ("os", "replace"), ("os", "rename"),
            ("h5py.Dataset", "__setitem__"), ("h5py.Dataset", "resize"), ("h5py.AttributeManager", "__setitem__"),
            ("h5py.File", "flush")]


class _IOFault:
    """Counts the I/O calls made while armed and raises KeyboardInterrupt at call ``at``."""

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.calls, self.armed = at, 0, False
        for owner, name in IO_CALLS:
            obj = os if owner == "os" else getattr(h5py, owner.split(".")[1])
            monkeypatch.setattr(obj, name, self._wrap(getattr(obj, name)))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls == self.at:
                    self.armed = False
                    raise KeyboardInterrupt
            return fn(*args, **kwargs)
        return call

    def on_batch(self, i: int) -> None:
        self.armed = i == 0  # count the calls of the second batch's commit


def test_interrupt_at_every_io_call_of_a_batch_commit(wavlm, clip_set, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # how many I/O calls does committing the second batch take?
        dry = _IOFault(m, None)
        extract(clip_set, wavlm, tmp_path / "dry.h5", batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, on_batch=dry.on_batch)
    total = dry.calls
    assert total >= 4
    for at in sorted({1, total // 2, total - 2, total - 1, total}):
        out = tmp_path / f"cut{at}.h5"
        with monkeypatch.context() as m:
            fault = _IOFault(m, at)
            first = extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, on_batch=fault.on_batch)
        assert first.interrupted and not out.exists(), at
        second = extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0)
        assert second.ok == N_CLIPS and not second.interrupted, at
        assert_same_store(reference, out)
        assert featstore.check_store(out) == []


def _cli(args, env=None, timeout=300):
    import torch

    # the reference's thread count (other counts round differently), whatever earlier tests put in
    # the environment (a dask cluster sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in this process's environment)
    threads = str(torch.get_num_threads())
    base = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "cli.featstore_app", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**base, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads,
                               "MKL_NUM_THREADS": threads, **(env or {})})


def test_command_killed_in_the_commit_window_then_killed_again_while_finishing(wavlm, clip_set, audited_reference,
                                                                              tmp_path):
    out = tmp_path / "k.h5"
    args = ["extract", "--manifest", clip_set, "--model", wavlm, "--out", out, "--batch-seconds", BATCH_SECONDS]
    first = _cli(args, {"FEATSTORE_FAULT_AT": "batch:renamed:2"})  # renamed, directory not yet synced
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not out.exists() and len(list(partial_path(out).glob("b*.batch"))) == 2
    second = _cli(args, {"FEATSTORE_FAULT_AT": "final:replaced"})  # moved into place, not yet cleaned up
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert "batches already committed" in second.stderr and "resuming" in second.stderr
    assert out.exists() and partial_path(out).exists()
    third = _cli(args)
    assert third.returncode == 0, third.stderr
    assert "already complete" in third.stderr and "Traceback" not in third.stderr
    assert not partial_path(out).exists()
    assert featstore.store.compare_stores(audited_reference, out, ignore_attrs=("created_at", "extraction_stats",
                                                                                 "manifest")) == []


def test_sigterm_stops_at_a_batch_boundary(wavlm, clip_set, audited_reference, tmp_path, monkeypatch):
    out = tmp_path / "t.h5"
    real = fx.extract

    def pre_empted(*args, **kwargs):  # the scheduler sends SIGTERM while the first batch is committed
        return real(*args, on_batch=lambda i: os.kill(os.getpid(), signal.SIGTERM) if i == 0 else None, **kwargs)

    monkeypatch.setattr(fx, "extract", pre_empted)
    before = signal.getsignal(signal.SIGTERM)
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(out),
                            "--batch-seconds", str(BATCH_SECONDS)])
    assert r.exit_code == 130, r.output
    assert "stopped by SIGTERM after the batch in flight" in r.output and "run the same command again" in r.output
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was restored
    # batch 1 was already encoded when batch 0's commit ended: it is committed too, nothing further
    assert len(list(partial_path(out).glob("b*.batch"))) == 2
    monkeypatch.setattr(fx, "extract", real)
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(out),
                            "--batch-seconds", str(BATCH_SECONDS)])
    assert r.exit_code == 0, r.output
    assert_same_store(audited_reference, out)


@pytest.mark.parametrize("write_here", [True, False], ids=["cpu", "accelerator"])
def test_a_batch_is_committed_while_the_next_one_is_encoded(wavlm, clip_set, reference, tmp_path, monkeypatch,
                                                            write_here):
    """The wait for the disk (fsync) of batch n's commit runs beside the encode of batch n + 1 (with
    an accelerator, the checksums and the write too), one commit at a time, in plan order, and
    every batch is committed before extract() returns."""
    import threading
    import time

    events = []
    real_fsync, real_write, real_encode = os.fsync, fx.StoreWriter.write_items, fx._encode_batch

    def thread():
        return threading.current_thread().name

    def slow_fsync(fd):
        events.append(("sync start", thread()))
        time.sleep(0.3)  # a slow disk
        real_fsync(fd)
        events.append(("sync end", thread()))

    def write(self, *args, **kwargs):
        events.append(("write", thread()))
        return real_write(self, *args, **kwargs)

    def encode(*args, **kwargs):
        events.append(("encode", thread()))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(fx, "_commit_writes_here", lambda encoder: write_here)
    monkeypatch.setattr(fx.StoreWriter, "write_items", write)
    monkeypatch.setattr(fx, "_encode_batch", encode)
    committed = []
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", slow_fsync)
        res = extract(clip_set, wavlm, tmp_path / "o.h5", batch_seconds=BATCH_SECONDS, progress=False,
                      audit_clips=0, on_batch=lambda i: committed.append(i))
    assert res.ok == N_CLIPS
    n = [k for k, _ in events].count("encode")
    assert n >= 3 and committed == list(range(n))  # on_batch(i) once batch i is committed, in order
    writes = [name for k, name in events if k == "write"]
    assert writes == (["MainThread"] if write_here else ["featstore-commit_0"]) * n
    # batch n's commit waits for its fsync in the commit thread, and batch n + 1's encode begins
    # before that wait is over; the next write only after it
    ends = [i for i, ev in enumerate(events) if ev == ("sync end", "featstore-commit_0")]
    at = [i for i, (k, _) in enumerate(events) if k == "write"]
    enc = [i for i, (k, _) in enumerate(events) if k == "encode"]
    for b in range(n - 1):
        first_sync_end = min(i for i in ends if i > at[b])
        assert enc[b + 1] < first_sync_end < at[b + 1], b
    assert_same_store(reference, res.path)


def test_resume_keeps_the_recorded_batch_plan(wavlm, clip_set, reference, tmp_path):
    out = tmp_path / "p.h5"

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    assert extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, on_batch=stop).interrupted
    console, buf = quiet()
    res = extract(clip_set, wavlm, out, batch_seconds=60, progress=False, audit_clips=0, console=console)  # other --batch-seconds
    assert res.resumed and res.ok == N_CLIPS
    assert "keeping the first run's batch plan (--batch-seconds 0.3)" in buf.getvalue()
    assert_same_store(reference, out)


def test_resume_uses_the_recorded_thread_count(tiny_models, clip_set, reference, tmp_path):
    import torch

    from featstore.encoders.hf_ssl import SSLEncoder

    enc = SSLEncoder(tiny_models["wavlm"])
    used = []
    real = enc.encode
    enc.encode = lambda clips: used.append(torch.get_num_threads()) or real(clips)
    out = tmp_path / "t.h5"
    first_threads = torch.get_num_threads()

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    assert extract(clip_set, enc, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, on_batch=stop).interrupted
    other = 1 if first_threads > 1 else 2
    torch.set_num_threads(other)
    try:
        used.clear()
        console, buf = quiet()
        res = extract(clip_set, enc, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, console=console)
        assert torch.get_num_threads() == other  # restored afterwards
    finally:
        torch.set_num_threads(first_threads)
    assert res.ok == N_CLIPS and used and set(used) == {first_threads}
    assert f"using the first run's {first_threads} torch thread(s) (this process has {other})" in buf.getvalue()


def _damage_partial(out: Path, how: str) -> None:
    """Damage whatever the unfinished run is on disk (a batch directory or a single file)."""
    pp = partial_path(out)
    if pp.is_dir():
        target = sorted(pp.glob("b*.batch"))[0] if how != "record" else pp / "run.json"
    else:
        target = pp
    data = bytearray(target.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        for i in range(100, len(data) - 100, max(1, len(data) // 50)):
            data[i] ^= 0xFF
    else:  # the record (or the file's beginning)
        data[: min(len(data), 64)] = b"\0" * min(len(data), 64)
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "record"])
def test_damaged_unfinished_run_is_recovered_with_one_line(wavlm, clip_set, reference, tmp_path, how):
    out = tmp_path / "d.h5"

    def stop(i):
        if i == 2:
            raise KeyboardInterrupt

    assert extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, on_batch=stop).interrupted
    _damage_partial(out, how)
    console, buf = quiet()
    res = extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0, console=console)
    assert res.ok == N_CLIPS
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    told = [ln for ln in lines if "damaged" in ln]
    assert len(told) == 1, lines
    assert "redone" in told[0] or "starting over" in told[0] or "kept" in told[0]
    assert "Traceback" not in buf.getvalue()
    assert_same_store(reference, out)


# ---------------------------------------------------------------------------------------------
# Never stale
# ---------------------------------------------------------------------------------------------
def test_changed_inputs_or_settings_refuse_a_finished_store(wavlm, clip_set, tiny_models, tmp_path):
    out = tmp_path / "s.h5"
    extract(clip_set, wavlm, out, progress=False, audit_clips=0)
    cases = [
        (dict(layers="0,2"), ["layer_ids: the store 0-2, this run 0,2"]),
        (dict(dtype="float16"), ["dtype: the store float32, this run float16"]),
        (dict(crop_to_segment=True), ["crop_to_segment: the store False, this run True"]),
        (dict(group_column="sex"), ["group_column: the store speaker, this run sex"]),
        (dict(shard="1/2"), ["shard: the store '', this run 1/2", "shard_rows"]),
        (dict(model=str(tiny_models["hubert"])), ["encoder: the store ...", "encoder_revision"]),
    ]
    for options, fields in cases:
        model = options.pop("model", wavlm)
        with pytest.raises(featstore.store.StoreMismatch) as exc:
            extract(clip_set, model, out, progress=False, **options)
        msg = str(exc.value)
        assert msg.startswith(f"{out} was built with other inputs or settings — "), msg
        assert msg.endswith("rebuild it with --overwrite (the new store replaces it only once complete) or write to "
                            "another --out")
        for f in fields:
            assert f in msg, (options, msg)
    # an edited manifest: labels fixed after the first extraction
    text = clip_set.read_bytes()
    clip_set.write_bytes(text.replace(b",a,", b",A,"))
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(out)])
    assert r.exit_code == 2
    assert "manifest_sha256 (the manifest's content changed:" in r.output and "--overwrite" in r.output
    assert "Traceback" not in r.output
    clip_set.write_bytes(text)
    again = extract(clip_set, wavlm, out, progress=False)
    assert again.already_done and again.ok == N_CLIPS


def test_an_unreadable_store_is_not_reused(wavlm, clip_set, tmp_path):
    out = tmp_path / "u.h5"
    out.write_bytes(b"not an HDF5 file at all")
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"error: {out} exists but cannot be read: " in r.output and "; rebuild it with --overwrite" in r.output
    assert extract(clip_set, wavlm, out, overwrite=True, progress=False, audit_clips=0).ok == N_CLIPS


def test_whisper_window_is_part_of_the_identity(clip_set, tmp_path):
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=32,
                        max_target_positions=8, max_source_positions=1500, num_mel_bins=80, pad_token_id=1,
                        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    model_dir = tmp_path / "whisper"
    WhisperModel(cfg).save_pretrained(model_dir)
    WhisperFeatureExtractor().save_pretrained(model_dir)
    out = tmp_path / "w.h5"
    extract(clip_set, str(model_dir), out, progress=False, audit_clips=0, encoder_options={"context_seconds": 1.0})
    with pytest.raises(featstore.store.StoreMismatch, match="whisper_context_seconds: the store 1.0, this run 2.0"):
        extract(clip_set, str(model_dir), out, progress=False, encoder_options={"context_seconds": 2.0})


def test_overwrite_builds_aside_and_an_interrupted_overwrite_keeps_the_old_store(wavlm, clip_set, tmp_path):
    out = tmp_path / "o.h5"
    extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0)
    keep = tmp_path / "copy.h5"
    keep.write_bytes(out.read_bytes())

    def stop(i):
        raise KeyboardInterrupt

    res = extract(clip_set, wavlm, out, layers="0", overwrite=True, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0,
                  on_batch=stop)
    assert res.interrupted
    assert out.read_bytes() == keep.read_bytes()  # the old store, untouched
    assert featstore.check_store(out) == []
    # the old command still finds its store complete; the interrupted rebuild is left alone
    assert extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0).already_done
    assert partial_path(out).is_dir()
    console, buf = quiet()
    done = extract(clip_set, wavlm, out, layers="0", overwrite=True, batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0,
                   console=console)
    assert done.resumed and "resuming" in buf.getvalue()
    with featstore.open(out) as s:
        assert s.layer_ids == [0] and s.num_items == N_CLIPS


def test_predict_cache_is_rebuilt_when_the_manifest_changes(wavlm, clip_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = fx.extract_for_predict(clip_set, wavlm, progress=False, audit_clips=0)
    assert first.parent == Path("cache/predict")
    with featstore.open(first) as s:
        assert s.column("label")[0] == "a"
    clip_set.write_text(clip_set.read_text().replace(",a,", ",A,"))
    second = fx.extract_for_predict(clip_set, wavlm, progress=False, audit_clips=0)
    assert second == first
    with featstore.open(second) as s:
        assert s.column("label")[0] == "A"
    mtime = second.stat().st_mtime_ns
    assert fx.extract_for_predict(clip_set, wavlm, progress=False, audit_clips=0) == second and second.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# One writer, reserved names, non-finite frames, exit codes
# ---------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused(wavlm, clip_set, tmp_path):
    import fcntl
    import json
    import socket

    out = tmp_path / "w.h5"
    # another writer holds the lock beside the store (an flock on w.h5.lock naming its holder)
    fd = os.open(tmp_path / "w.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": socket.gethostname(), "started": "2024-05-01T10:00:00+00:00"}).encode())
    try:
        with pytest.raises(Exception, match=rf"w\.h5 is being written by pid 4242 on host {socket.gethostname()}, "
                                            r"started 2024-05-01T10:00:00\+00:00 \(lock .*w\.h5\.lock\); wait for"):
            extract(clip_set, wavlm, out, progress=False, audit_clips=0)
        r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(out)])
        assert r.exit_code == 2 and "is being written by pid 4242" in r.output and "Traceback" not in r.output
        assert not out.exists() and not partial_path(out).exists()
    finally:
        os.close(fd)  # the holder ends (its lock goes with it)
    assert extract(clip_set, wavlm, out, progress=False, audit_clips=0).ok == N_CLIPS


def test_reserved_column_names_give_one_error_and_leave_no_file(wavlm, tmp_path):
    write_wav(tmp_path / "a.wav", (0.1 * np.random.default_rng(0).normal(size=2400)).astype(np.float32))
    man = write_manifest(tmp_path / "m.csv", [{"path": "a.wav", "label": "x", "status": "done", "group": "g1",
                                               "offset": "3", "sex": "F"}])
    out = tmp_path / "out" / "s.h5"
    with pytest.raises(featstore.manifest.ManifestError) as exc:
        extract(man, wavlm, out, progress=False)
    assert str(exc.value) == (
        f"{man}: columns 'status', 'group', 'offset' are reserved: the store fills items/status etc. itself; rename "
        "them in the manifest (e.g. 'status' -> 'manifest_status') or name the speaker column with --group-column group")
    assert not (tmp_path / "out").exists()
    r = runner.invoke(app, ["extract", "--manifest", str(man), "--model", wavlm, "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [f"error: {exc.value}"]
    assert not (tmp_path / "out").exists()
    # `group` is fine as the group column
    ok = write_manifest(tmp_path / "g.csv", [{"path": "a.wav", "label": "x", "group": "g1"}])
    res = extract(ok, wavlm, tmp_path / "g.h5", progress=False, audit_clips=0, group_column="group")
    assert res.ok == 1 and featstore.open(res.path).column("group")[0] == "g1"


def test_an_encoder_returning_nan_for_one_clip_marks_only_that_clip(tiny_models, clip_set, reference, tmp_path):
    from featstore.encoders.hf_ssl import SSLEncoder

    enc = SSLEncoder(tiny_models["wavlm"])
    target = featstore.open(reference).items.loc[5, "num_samples"]
    real = enc.encode

    def encode(clips):
        out = real(clips)
        for c, layers in zip(clips, out):
            if len(c) == target:
                layers[2][1, 3] = np.nan
        return out

    enc.encode = encode
    res = extract(clip_set, enc, tmp_path / "n.h5", batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0)
    assert res.ok == N_CLIPS - 1
    assert res.failures == [("c05", "nonfinite", "the encoder returned 1 NaN/inf values in layer 2")]
    with featstore.open(res.path) as got, featstore.open(reference) as ref:
        assert got.items.loc[5, "num_frames"] == 0 and got.items.loc[5, "num_samples"] == target
        for i in range(N_CLIPS):
            if i != 5:
                for k in range(3):
                    assert got.frames(i, k).tobytes() == ref.frames(i, k).tobytes()
    assert featstore.check_store(res.path) == []


def test_float16_overflow_is_reported(tiny_models, clip_set, reference, tmp_path):
    from featstore.encoders.hf_ssl import SSLEncoder

    enc = SSLEncoder(tiny_models["wavlm"])
    target = featstore.open(reference).items.loc[7, "num_samples"]
    real = enc.encode
    enc.encode = lambda clips: [[x * (1e6 if len(c) == target and k == 1 else 1) for k, x in enumerate(o)]
                                for c, o in zip(clips, real(clips))]
    res = extract(clip_set, enc, tmp_path / "h.h5", dtype="float16", batch_seconds=BATCH_SECONDS, progress=False, audit_clips=0)
    (item, status, msg), = res.failures
    assert (item, status) == ("c07", "nonfinite") and res.ok == N_CLIPS - 1
    assert msg.startswith("frames overflow float16 in layer 1 (|values| up to ")
    assert msg.endswith("above 65504); use --dtype float32")


def test_a_run_where_every_item_failed_exits_nonzero(wavlm, tmp_path):
    man = write_manifest(tmp_path / "m.csv", [{"path": "gone1.wav", "label": "a"}, {"path": "gone2.wav", "label": "b"}])
    out = tmp_path / "f.h5"
    args = ["extract", "--manifest", str(man), "--model", wavlm, "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "error: every item failed (2 of 2: missing 2); the store" in r.output
    r = runner.invoke(app, args)  # the finished, all-failed store is still not a success
    assert r.exit_code == 1 and "already complete" in r.output and "every item failed" in r.output
    good = tmp_path / "ok.wav"
    write_wav(good, (0.1 * np.random.default_rng(0).normal(size=2400)).astype(np.float32))
    man2 = write_manifest(tmp_path / "m2.csv", [{"path": "ok.wav", "label": "a"}, {"path": "gone.wav", "label": "b"}])
    r = runner.invoke(app, ["extract", "--manifest", str(man2), "--model", wavlm, "--out", str(tmp_path / "p.h5")])
    assert r.exit_code == 0, r.output  # one ok item: done (the failure is listed)
    assert "gone: missing" in r.output


def test_option_errors_name_the_real_cause(wavlm, clip_set, tmp_path, monkeypatch):
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(tmp_path / "x.h5"),
                            "--context-seconds", "2"])
    assert r.exit_code == 2
    assert (f"error: --context-seconds does not apply to model '{wavlm}' (loaded as SSLEncoder); it is for Whisper "
            "encoders only") in r.output.replace("\n", "")
    # a TypeError that has nothing to do with options is not reported as one
    monkeypatch.setattr(fx, "read_manifest", lambda *a, **k: (_ for _ in ()).throw(TypeError("bug in reading")))
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", wavlm, "--out", str(tmp_path / "y.h5")])
    assert r.exit_code != 0 and "option not supported" not in r.output


def _textgrid(path, intervals):
    body = "".join(f'        intervals [{i + 1}]:\n            xmin = {a}\n            xmax = {b}\n            text = "{t}"\n'
                   for i, (a, b, t) in enumerate(intervals))
    path.write_text('File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\ntiers? <exists>\n'
                    'size = 1\nitem []:\n    item [1]:\n        class = "IntervalTier"\n        name = "phones"\n'
                    f'        xmin = 0\n        xmax = 1\n        intervals: size = {len(intervals)}\n' + body)


def test_edited_textgrid_is_never_resumed_or_reused_with_the_old_rows(tmp_path):
    """The manifest file is unchanged, the TextGrid beside a clip is not: the parsed rows differ, so
    neither the unfinished run nor the finished store may be used for them (it crashed, or answered
    with the old segments)."""
    from featstore.store import StoreMismatch

    x = (0.1 * np.random.default_rng(0).normal(size=16000)).astype(np.float32)
    for k in range(3):
        write_wav(tmp_path / f"spk{k}.wav", x)
        _textgrid(tmp_path / f"spk{k}.TextGrid", [(0, 0.3, "a"), (0.3, 0.5, "s"), (0.5, 1, "z")])
    man = write_manifest(tmp_path / "m.csv", [{"path": f"spk{k}.wav", "label": "L", "speaker": f"k{k}"} for k in range(3)])
    kw = dict(textgrid_tier="phones", textgrid_labels=["s", "z"], batch_seconds=1.5, progress=False, audit_clips=0)
    out = tmp_path / "tg.h5"

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    assert extract(man, "logmel", out, on_batch=stop, **kw).interrupted
    _textgrid(tmp_path / "spk1.TextGrid", [(0, 0.2, "s"), (0.2, 0.5, "s"), (0.5, 1, "z")])  # one more segment
    with pytest.raises(StoreMismatch, match="rows_digest") as exc:
        extract(man, "logmel", out, **kw)
    assert "segments" in str(exc.value)
    res = extract(man, "logmel", out, overwrite=True, **kw)
    fresh = extract(man, "logmel", tmp_path / "fresh.h5", **kw)
    assert res.ok == fresh.ok == 7
    assert_same_store(fresh.path, out)
    _textgrid(tmp_path / "spk2.TextGrid", [(0, 0.3, "a"), (0.3, 0.6, "s"), (0.6, 1, "z")])  # a moved boundary
    with pytest.raises(StoreMismatch, match="rows_digest"):
        extract(man, "logmel", out, **kw)


def test_ctrl_c_during_the_audit_while_the_final_file_is_built(wavlm, clip_set, audited_reference, tmp_path,
                                                               monkeypatch):
    """The padding audit computes while a thread copies the layers into the final file; a Ctrl-C
    there stops that thread before extract() returns (nothing is written after it), and the same
    command then finishes the run to the uninterrupted store."""
    import threading

    from featstore.encoders.hf_ssl import SSLEncoder

    out = tmp_path / "a.h5"
    seen = []

    def interrupted(self, clips, pad_seconds=1.0, frames=None):
        seen.append([t.name for t in threading.enumerate() if t.name == "featstore-build"])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(SSLEncoder, "padding_audit", interrupted)
        first = extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False)
    assert seen == [["featstore-build"]]  # the build ran beside the audit
    assert first.interrupted and not out.exists()
    assert not [t for t in threading.enumerate() if t.name == "featstore-build"]
    assert not (partial_path(out) / "final.h5").exists()
    second = extract(clip_set, wavlm, out, batch_seconds=BATCH_SECONDS, progress=False)
    assert second.ok == N_CLIPS and not second.interrupted
    assert featstore.store.compare_stores(audited_reference, out, ignore_attrs=("created_at", "extraction_stats",
                                                                                 "manifest")) == []

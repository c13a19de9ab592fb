"""Shards + merge == single run; out-of-memory back-off loses no clip; CLI of the store."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import featstore
from featstore_cli.featstore_app import app
from featstore.extract import encode_with_backoff, extract, shard_rows
from featstore.merge import MergeError, merge_shards

runner = CliRunner()


def test_shard_rows_partition():
    parts = [shard_rows(10, (k, 3)) for k in (1, 2, 3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == list(range(10))


def test_shards_merge_equal_single_run(tiny_models, clip_set, tmp_path):
    model = str(tiny_models["wavlm"])
    single = extract(clip_set, model, tmp_path / "single.h5", progress=False)
    shards = [extract(clip_set, model, tmp_path / f"s{k}.h5", shard=f"{k}/3", progress=False).path for k in (1, 2, 3)]
    assert [featstore.open(p).num_items for p in shards] == [4, 4, 4]
    merged = merge_shards([shards[2], shards[0], shards[1]], tmp_path / "merged.h5")
    a, b = featstore.open(single.path), featstore.open(merged)
    cols = ["id", "path", "label", "group", "num_samples", "num_frames", "status", "sha256", "sex"]
    assert a.items[cols].equals(b.items[cols])
    for i in range(a.num_items):
        for k in a.layer_ids:
            np.testing.assert_allclose(a.frames(i, k), b.frames(i, k), atol=1e-5)
    assert featstore.check_store(merged) == []
    assert b.attrs["shard"] == "" and len(b.attrs["merged_from"]) == 3
    assert b.attrs["rows_digest"] == a.attrs["rows_digest"]  # the shards' row digests add up to the single run's
    assert extract(clip_set, model, merged, progress=False).already_done  # the merged store is the single run's


def test_merge_refuses_mismatched_or_incomplete(tiny_models, clip_set, tmp_path):
    s1 = extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "a1.h5", shard="1/2", progress=False).path
    s2 = extract(clip_set, str(tiny_models["hubert"]), tmp_path / "b2.h5", shard="2/2", progress=False).path
    with pytest.raises(MergeError, match="differs from a1.h5 in encoder"):
        merge_shards([s1, s2], tmp_path / "m.h5")
    with pytest.raises(MergeError, match="need shards 1..N of one N exactly once, got 1/2"):
        merge_shards([s1], tmp_path / "m.h5")
    r = runner.invoke(app, ["merge", str(s1), "--out", str(tmp_path / "m.h5")])
    assert r.exit_code == 2 and "need shards 1..N" in r.output


class _OOMOnBigBatches:
    """An encoder stand-in that fails like CUDA does when a batch holds more than 2 clips."""

    def __init__(self):
        self.calls = []

    def encode(self, clips):
        self.calls.append(len(clips))
        if len(clips) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [[np.full((1, 1), float(len(c)))] for c in clips]


def test_oom_backoff_splits_and_keeps_every_clip():
    enc = _OOMOnBigBatches()
    clips = [np.zeros(n) for n in range(1, 8)]
    splits = []
    out = encode_with_backoff(enc, clips, on_split=splits.append)
    assert [o[0][0, 0] for o in out] == [1, 2, 3, 4, 5, 6, 7]  # order kept, none lost
    assert splits == [7, 3, 4]
    with pytest.raises(ValueError):
        encode_with_backoff(type("E", (), {"encode": lambda self, c: (_ for _ in ()).throw(ValueError("bug"))})(), clips)


def test_cli_extract_info_check(tiny_models, clip_set, tmp_path):
    out = tmp_path / "cli.h5"
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", str(tiny_models["wavlm"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "featstore extract" in r.output and out.exists()
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "12 (12 ok)" in r.output and "padding_exact" in r.output
    r = runner.invoke(app, ["check", str(out)])
    assert r.exit_code == 0 and "invariants hold" in r.output
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", str(tiny_models["wavlm"]), "--out", str(out)])
    assert r.exit_code == 0 and "already complete" in r.output


def test_cli_errors_are_one_line(tmp_path, clip_set, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    r = runner.invoke(app, ["extract", "--manifest", str(clip_set), "--model", "wavlm-base-plus", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 2
    assert "model 'wavlm-base-plus' (microsoft/wavlm-base-plus) is not in the local Hugging Face cache" in r.output
    assert "huggingface-cli download microsoft/wavlm-base-plus" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["extract", "--manifest", str(tmp_path / "nope.csv"), "--model", "logmel"])
    assert r.exit_code == 2 and "manifest not found" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.wav,x\n")
    r = runner.invoke(app, ["extract", "--manifest", str(bad), "--model", "logmel"])
    assert r.exit_code == 2 and "no 'path' column (columns: file, label)" in r.output
    r = runner.invoke(app, ["check", str(tmp_path / "missing.h5")])
    assert r.exit_code == 1 and "no store at" in r.output


def test_merge_compares_every_identity_field_the_run_recorded(tiny_models, clip_set, tmp_path):
    import h5py

    model = str(tiny_models["wavlm"])
    shards = [extract(clip_set, model, tmp_path / f"s{k}.h5", shard=f"{k}/2", progress=False).path for k in (1, 2)]
    with featstore.open(shards[0]) as s:
        keys = set(s.attrs["identity_keys"])
    assert {"cnn_kernel", "rows_digest", "format_version", "manifest_sha256"} <= keys
    with h5py.File(shards[1], "r+") as h:  # a shard computed with the other CNN kernel
        h.attrs["cnn_kernel"] = "conv1d" if h.attrs["cnn_kernel"] == "gemm" else "gemm"
    with pytest.raises(MergeError, match="in cnn_kernel"):
        merge_shards(shards, tmp_path / "merged.h5")

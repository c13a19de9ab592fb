"""lhotse manifests and Hugging Face datasets as --manifest, built here from small made-up data."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import featstore
from featstore_cli.featstore_app import app
from featstore.extract import extract
from featstore.manifest import ManifestError, ManifestWarning, read_manifest
from tests.conftest import write_manifest, write_wav

lhotse = pytest.importorskip("lhotse")
datasets = pytest.importorskip("datasets")
runner = CliRunner()


def noise(n, seed):
    return (0.1 * np.random.default_rng(seed).normal(size=n)).astype(np.float32)


def wav_bytes(x, sr=16000):
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def frames_by_id(path):
    with featstore.open(path) as st:
        items = st.items
        return {r["id"]: (st.frames(i, 0), r["segment_start_frame"], r["segment_end_frame"], r["status"])
                for i, r in items.iterrows()}


# ---------------------------------------------------------------------------------------------
# lhotse
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def lhotse_set(tmp_path):
    """3 recordings on disk (one gone after the manifest was written), supervisions with speaker,
    text and custom fields, one supervision of an unknown recording."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    d = tmp_path / "data"
    for i in range(4):
        write_wav(d / f"rec{i}.wav", noise(16000, i))
    recs = RecordingSet.from_recordings([Recording.from_file(d / f"rec{i}.wav") for i in range(4)])
    (d / "rec3.wav").unlink()  # listed, but the file is gone
    sups = SupervisionSet.from_segments([
        SupervisionSegment(id="s0", recording_id="rec0", start=0.1, duration=0.2, speaker="k1", text="sa",
                           custom={"diagnosis": "Normal", "age": 5}),
        SupervisionSegment(id="s1", recording_id="rec0", start=0.5, duration=0.25, speaker="k1", text="zo",
                           custom={"diagnosis": "Normal", "age": 5}),
        SupervisionSegment(id="s2", recording_id="rec1", start=0.2, duration=0.3, speaker="k2", text="su",
                           custom={"diagnosis": "Lateral", "age": 6}),
        SupervisionSegment(id="s3", recording_id="nowhere", start=0.0, duration=0.3, speaker="k3"),
        SupervisionSegment(id="s4", recording_id="rec3", start=0.0, duration=0.3, speaker="k3",
                           custom={"diagnosis": "Lateral", "age": 7}),
    ])
    recs.to_file(d / "kids_recordings_train.jsonl.gz")
    sups.to_file(d / "kids_supervisions_train.jsonl.gz")
    return d, recs, sups


def test_lhotse_recordings_and_supervisions(lhotse_set, tmp_path):
    d, recs, sups = lhotse_set
    out = tmp_path / "l.h5"
    r = runner.invoke(app, ["extract", "--manifest", str(d / "kids_recordings_train.jsonl.gz"), "--model", "logmel",
                            "--out", str(out), "--columns", "label=diagnosis"])
    assert r.exit_code == 0, r.output
    with featstore.open(out) as st:
        items = st.items
        assert list(items["id"]) == ["s0", "s1", "s2", "s3", "s4", "rec2"]  # supervisions in order, nothing vanished
        assert list(items["status"]) == ["ok", "ok", "ok", "missing", "missing", "no_segment"]
        err = dict(zip(items["id"], items["error"]))
        assert err["s3"] == "supervision 's3': recording 'nowhere' is not in kids_recordings_train.jsonl.gz"
        assert err["s4"].startswith("file not found:") and err["s4"].endswith("rec3.wav")
        assert err["rec2"] == "recording 'rec2': no supervision in kids_supervisions_train.jsonl.gz refers to this recording"
        assert list(items["label"][:3]) == ["Normal", "Normal", "Lateral"] and list(items["group"][:3]) == ["k1", "k1", "k2"]
        assert list(items["text"][:3]) == ["sa", "zo", "su"] and list(items["age"][:3]) == ["5", "5", "6"]
        assert list(items["recording_id"][:3]) == ["rec0", "rec0", "rec1"]
        assert st.attrs["group_column"] == "speaker"
    # the same items as a CSV manifest with start/end: identical frames and segments
    csv = write_manifest(tmp_path / "same.csv", [
        {"id": "s0", "path": str(d / "rec0.wav"), "start": 0.1, "end": 0.3},
        {"id": "s1", "path": str(d / "rec0.wav"), "start": 0.5, "end": 0.75},
        {"id": "s2", "path": str(d / "rec1.wav"), "start": 0.2, "end": 0.5}])
    ref = frames_by_id(extract(csv, "logmel", tmp_path / "ref.h5", progress=False).path)
    got = frames_by_id(out)
    for sid in ("s0", "s1", "s2"):
        np.testing.assert_array_equal(got[sid][0], ref[sid][0])
        assert got[sid][1:3] == ref[sid][1:3] and got[sid][2] > got[sid][1]


def test_lhotse_supervisions_file_finds_its_recordings_and_bad_files_are_one_error(lhotse_set, tmp_path):
    d, recs, sups = lhotse_set
    man = read_manifest(d / "kids_supervisions_train.jsonl.gz")
    assert [r.id for r in man.rows] == ["s0", "s1", "s2", "s3", "s4", "rec2"] and man.format == "lhotse"
    assert man.sha256 == read_manifest(d / "kids_recordings_train.jsonl.gz").sha256
    alone = tmp_path / "only_supervisions.jsonl.gz"
    sups.to_file(alone)
    with pytest.raises(ManifestError, match="is a lhotse SupervisionSet: its recordings are needed too"):
        read_manifest(alone)
    bad = tmp_path / "broken_recordings.jsonl"
    bad.write_text('{"id": "x", "sources": \n')
    r = runner.invoke(app, ["extract", "--manifest", str(bad), "--model", "logmel", "--out", str(tmp_path / "b.h5")])
    assert r.exit_code == 2 and "cannot read as a lhotse manifest" in r.output and "Traceback" not in r.output
    # recordings alone: one item per recording, no segment
    rec_only = tmp_path / "solo_recordings.jsonl.gz"
    recs.to_file(rec_only)
    man = read_manifest(rec_only)
    assert [(r.id, r.start, r.status) for r in man.rows][:3] == [("rec0", None, ""), ("rec1", None, ""), ("rec2", None, "")]
    # the format by name, or explicitly
    assert read_manifest(rec_only, format="lhotse").sha256 == man.sha256
    with pytest.raises(ManifestError, match="unknown manifest format 'kaldi'; use one of auto, csv, folder, lhotse, hf"):
        read_manifest(rec_only, format="kaldi")


def test_lhotse_cuts_whole_and_trimmed(lhotse_set, tmp_path):
    from lhotse import CutSet

    d, recs, sups = lhotse_set
    known = sups.filter(lambda s: s.recording_id in ("rec0", "rec1"))
    whole = CutSet.from_manifests(recordings=recs.filter(lambda r: r.id != "rec3"), supervisions=known)
    whole.to_file(tmp_path / "cuts.jsonl.gz")
    man = read_manifest(tmp_path / "cuts.jsonl.gz", columns={"label": "diagnosis"})
    rows = {r.id: r for r in man.rows}
    # one item per supervision inside a cut; a cut without one is one item of the whole cut
    assert [(r.id, r.extra["cut_id"], r.start) for r in man.rows] == [
        ("s0", "rec0-0", 0.1), ("s1", "rec0-0", 0.5), ("s2", "rec1-1", 0.2), ("rec2-2", "rec2-2", None)]
    assert (rows["s1"].start, rows["s1"].end, rows["s1"].label, rows["s1"].group) == (0.5, 0.75, "Normal", "k1")
    assert rows["s0"].path.endswith("rec0.wav")  # a cut of the whole recording reads the file itself
    trimmed = whole.trim_to_supervisions(keep_overlapping=False)
    trimmed.to_file(tmp_path / "trim_cuts.jsonl.gz")
    cache = tmp_path / "audio-cache"
    res = extract(tmp_path / "trim_cuts.jsonl.gz", "logmel", tmp_path / "t.h5", audio_cache=cache, progress=False,
                  columns={"label": "diagnosis"})
    assert res.ok == 3 and len(list(cache.iterdir())) == 3
    # each trimmed cut is its supervision's audio: the same frames as cropping the CSV's segment
    csv = write_manifest(tmp_path / "crop.csv", [
        {"id": "s0", "path": str(d / "rec0.wav"), "start": 0.1, "end": 0.3},
        {"id": "s2", "path": str(d / "rec1.wav"), "start": 0.2, "end": 0.5}])
    ref = frames_by_id(extract(csv, "logmel", tmp_path / "c.h5", crop_to_segment=True, progress=False).path)
    got = frames_by_id(res.path)
    for sid in ("s0", "s2"):
        np.testing.assert_allclose(got[sid][0], ref[sid][0], atol=1e-5)
        assert got[sid][1] == 0 and got[sid][2] == len(got[sid][0])  # the segment is the whole cut


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------
def hf_dataset(tmp_path):
    from datasets import Audio, ClassLabel, Dataset, Features, Value

    List = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 calls it Sequence

    write_wav(tmp_path / "file0.wav", noise(6000, 0))
    x44 = noise(int(0.4 * 44100), 1)
    audio = [
        {"path": str(tmp_path / "file0.wav"), "bytes": None},  # a file: save_to_disk embeds its bytes
        {"path": None, "bytes": wav_bytes(noise(5000, 2))},  # in memory only, no path
        {"path": None, "bytes": wav_bytes(np.stack([x44, x44], 1), 44100)},  # stereo 44.1 kHz
        {"path": None, "bytes": b"not audio at all"},
    ]
    ds = Dataset.from_dict({"audio": audio, "label": [0, 1, 1, 0], "speaker_id": ["a", "a", "b", "b"],
                            "onset": [0.1, 0.1, 0.1, 0.1], "emb": [[1.0], [2.0], [3.0], [4.0]]})
    return ds.cast(Features({"audio": Audio(), "label": ClassLabel(names=["Normal", "Lateral"]),
                             "speaker_id": Value("string"), "onset": Value("float32"), "emb": List(Value("float32"))}))


def test_hf_dataset_on_disk_with_in_memory_audio(tmp_path):
    ds = hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "file0.wav").unlink()  # the saved dataset holds the audio itself
    cache = tmp_path / "audio-cache"
    out = tmp_path / "hf.h5"
    r = runner.invoke(app, ["extract", "--manifest", str(tmp_path / "hf"), "--model", "logmel", "--out", str(out),
                            "--columns", "speaker=speaker_id", "--audio-cache", str(cache)])
    assert r.exit_code == 0, r.output
    assert r.output.count("'emb' is not a single value per row") == 1
    assert r.output.count("'onset' looks like segment times") == 1
    with featstore.open(out) as st:
        items = st.items
        assert list(items["id"]) == ["file0", "1", "2", "3"]
        assert list(items["status"]) == ["ok", "ok", "ok", "unreadable"]
        assert list(items["label"]) == ["Normal", "Lateral", "Lateral", "Normal"]  # ClassLabel names
        assert list(items["group"]) == ["a", "a", "b", "b"] and list(items["onset"]) == ["0.1"] * 4
        assert list(items["source_path"]) == ["file0.wav", "", "", ""]
        assert items["note"][2] == "down-mixed from 2 channels, resampled from 44100 Hz"
        assert "cannot decode" in items["error"][3]
        assert set(st.extra_columns) == {"onset", "source_path"}
    # the in-memory item has exactly the frames of the same audio read from a wav file
    write_wav(tmp_path / "one.wav", noise(5000, 2))
    ref = extract(write_manifest(tmp_path / "one.csv", [{"path": "one.wav"}]), "logmel", tmp_path / "one.h5", progress=False)
    np.testing.assert_array_equal(frames_by_id(out)["1"][0], frames_by_id(ref.path)["one"][0])
    # a second read writes nothing and gives the same manifest hash
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    with pytest.warns(ManifestWarning):
        a = read_manifest(tmp_path / "hf", columns={"speaker": "speaker_id"}, audio_cache=cache)
        b = read_manifest(tmp_path / "hf", columns={"speaker": "speaker_id"}, audio_cache=cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before and len(before) == 4
    assert a.sha256 == b.sha256 == featstore.open(out).attrs["manifest_sha256"]


def test_hf_dataset_dict_splits_and_path_columns(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = hf_dataset(tmp_path)
    DatasetDict({"train": ds, "test": ds.select([1, 2])}).save_to_disk(str(tmp_path / "hfd"))
    with pytest.warns(ManifestWarning):
        man = read_manifest(tmp_path / "hfd", audio_cache=tmp_path / "c")
        test = read_manifest(tmp_path / "hfd", split="test", audio_cache=tmp_path / "c")
    assert [r.id for r in man.rows] == ["train-file0", "train-1", "train-2", "train-3", "test-0", "test-1"]
    assert [r.extra["split"] for r in man.rows] == ["train"] * 4 + ["test"] * 2
    assert [r.id for r in test.rows] == ["0", "1"] and "split" not in test.extra_columns  # row numbers of the split
    with pytest.raises(ManifestError, match=r"no split 'dev' \(splits: train, test\)"):
        read_manifest(tmp_path / "hfd", split="dev")
    # a dataset whose audio is a column of file paths (relative to the current directory, as in datasets)
    write_wav(tmp_path / "p0.wav", noise(4000, 3))
    paths = Dataset.from_dict({"path": [str(tmp_path / "p0.wav"), str(tmp_path / "gone.wav")], "label": ["x", "y"]})
    paths.save_to_disk(str(tmp_path / "hfp"))
    res = extract(tmp_path / "hfp", "logmel", tmp_path / "p.h5", progress=False)
    assert [(i, s) for i, s, _ in res.failures] == [("gone", "missing")] and res.ok == 1


def test_missing_optional_package_is_one_clear_error(tmp_path, monkeypatch):
    ds = hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "hf"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    r = runner.invoke(app, ["extract", "--manifest", str(tmp_path / "hf"), "--model", "logmel", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "needs the optional package 'datasets'" in r.output and "pip install 'featstore[datasets]'" in r.output

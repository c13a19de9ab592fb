"""Column mapping: which manifest columns hold the segment, speaker, label and id; warnings for
segment-like columns that are not used; the mapping is part of the manifest's hash."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

import featstore
from featstore_cli.featstore_app import app
from featstore.extract import extract
from featstore.manifest import ManifestError, ManifestWarning, parse_columns, read_manifest
from tests.conftest import write_manifest, write_wav

runner = CliRunner()


@pytest.fixture()
def onset_csv(tmp_path):
    """4 clips of 0.5 s whose segment is in columns onset/offset (seconds), ids in 'utt'."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        write_wav(tmp_path / f"w{i}.wav", (0.1 * rng.normal(size=8000)).astype(np.float32))
        rows.append({"path": f"w{i}.wav", "utt": f"u{i}", "diagnosis": "ab"[i % 2], "child_id": f"k{i // 2}",
                     "onset": [0.1, 0.15, 0.2, 0.25][i], "offset": [0.3, 0.35, 0.4, 0.45][i]})
    return write_manifest(tmp_path / "m.csv", rows)


@pytest.fixture()
def start_s_csv(onset_csv):
    """The same manifest with the segment in start_s/end_s (an extra column named 'offset' would
    clash with the store's own items/offset)."""
    path = onset_csv.with_name("s.csv")
    path.write_text(onset_csv.read_text().replace("onset,offset", "start_s,end_s"))
    return path


def test_unused_segment_columns_warn_and_name_the_fix(start_s_csv):
    with pytest.warns(ManifestWarning) as rec:
        man = read_manifest(start_s_csv)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "'start_s', 'end_s' look like segment times but are not used as the segment" in msg
    assert "pooling runs over the whole clip" in msg
    assert "--columns start=start_s,end=end_s" in msg and "columns={'start': 'start_s', 'end': 'end_s'}" in msg
    assert man.warnings == [msg]
    assert not man.has_segments and man.extra_columns == ["utt", "diagnosis", "child_id", "start_s", "end_s"]
    assert man.sha256 == hashlib.sha256(start_s_csv.read_bytes()).hexdigest()  # default mapping: the file's hash


def test_onset_offset_unmapped_is_an_error_that_names_the_mapping(onset_csv, tmp_path):
    """A column called 'offset' cannot be kept beside the store's own items/offset: the run stops
    before extracting anything, and says how to use the column."""
    with pytest.raises(ManifestError, match=r"column 'offset' looks like a segment time, but the store keeps items/offset "
                                            r"for itself.*--columns start=onset,end=offset"):
        read_manifest(onset_csv)
    r = runner.invoke(app, ["extract", "--manifest", str(onset_csv), "--model", "logmel", "--out", str(tmp_path / "o.h5")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "use it as the segment (--columns start=onset,end=offset" in r.output and "invalid literal" not in r.output


def test_mapping_gives_segments_speaker_label_id_and_changes_the_hash(onset_csv):
    plain = read_manifest(onset_csv, columns={"start": "onset", "end": "offset"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManifestWarning)  # a used mapping warns about nothing
        man = read_manifest(onset_csv, columns="start=onset,end=offset,speaker=child_id,label=diagnosis,id=utt")
    assert man.warnings == []
    assert [(r.id, r.label, r.group, r.start, r.end) for r in man.rows] == [
        ("u0", "a", "k0", 0.1, 0.3), ("u1", "b", "k0", 0.15, 0.35), ("u2", "a", "k1", 0.2, 0.4), ("u3", "b", "k1", 0.25, 0.45)]
    assert man.extra_columns == [] and man.group_column == "child_id"
    assert man.columns == {"path": "path", "id": "utt", "label": "diagnosis", "speaker": "child_id",
                           "start": "onset", "end": "offset"}
    hashes = {hashlib.sha256(onset_csv.read_bytes()).hexdigest(), plain.sha256, man.sha256,
              read_manifest(onset_csv, columns={"start": "onset", "end": "offset", "id": "utt"}).sha256}
    assert len(hashes) == 4  # every mapping is another manifest identity
    # --group-column is the speaker role: the same mapping, the same hash
    assert read_manifest(onset_csv, "child_id", columns={"start": "onset", "end": "offset"}).sha256 == \
        read_manifest(onset_csv, columns={"start": "onset", "end": "offset", "speaker": "child_id"}).sha256


@pytest.mark.parametrize("start,end", [("start_s", "end_s"), ("word_onset", "word_offset"), ("xmin", "xmax"), ("begin", "stop"),
                                       ("tmin", "tmax"), ("start_time", "end_time"), ("Start_Time", "End_Time"),
                                       ("Onset", "Offset"), ("seg_start", "seg_end"), ("t_start", "t_end"),
                                       ("start-sec", "end-sec")])
def test_segment_lookalikes_are_recognised(tmp_path, start, end):
    write_wav(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32))
    man_path = write_manifest(tmp_path / "m.csv", [{"path": "a.wav", start: 0.01, end: 0.05, "duration": 0.1, "trend": 1}])
    with pytest.warns(ManifestWarning, match=rf"'{start}', '{end}' look like segment times.*--columns start={start},end={end}"):
        man = read_manifest(man_path)
    assert "duration" not in man.warnings[0] and "trend" not in man.warnings[0]
    assert read_manifest(man_path, columns={"start": start, "end": end}).rows[0].start == 0.01


def test_milliseconds_and_already_segmented_manifests(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32))
    ms = write_manifest(tmp_path / "ms.csv", [{"path": "a.wav", "start_ms": 10, "end_ms": 50}])
    with pytest.warns(ManifestWarning, match="start/end are read as seconds, so convert milliseconds first"):
        read_manifest(ms)
    both = write_manifest(tmp_path / "both.csv", [{"path": "a.wav", "start": 0.01, "end": 0.05, "word_onset": 0.0}])
    with pytest.warns(ManifestWarning, match=r"'word_onset' looks like segment times .* the segment comes from columns 'start'/'end'$"):
        assert read_manifest(both).rows[0].start == 0.01


def test_bad_mappings_are_one_clear_error(onset_csv, tmp_path):
    with pytest.raises(ManifestError, match=r"column mapping start=begin: no such column \(columns: path, utt, diagnosis"):
        read_manifest(onset_csv, columns={"start": "begin", "end": "offset"})
    with pytest.raises(ManifestError, match=r"unknown column role 'speeker' in the column mapping; roles are path, id"):
        read_manifest(onset_csv, columns={"speeker": "child_id"})
    with pytest.raises(ManifestError, match="two speaker columns given"):
        read_manifest(onset_csv, "utt", columns={"speaker": "child_id"})
    with pytest.raises(ManifestError, match="bad column mapping 'start': use ROLE=COLUMN"):
        parse_columns("start,end=offset")
    with pytest.raises(ManifestError, match="start and end both map to column 'onset'"):
        read_manifest(onset_csv, columns={"start": "onset", "end": "onset"})
    labelled = write_manifest(tmp_path / "l.csv", [{"path": "w0.wav", "label": "x", "diagnosis": "a"}])
    with pytest.raises(ManifestError, match=r"column 'label' is not used \(the label comes from column 'diagnosis'\)"):
        read_manifest(labelled, columns={"label": "diagnosis"})


def test_cli_prints_the_warning_once_and_the_mapping_reaches_the_store(start_s_csv, tmp_path):
    out = tmp_path / "plain.h5"
    r = runner.invoke(app, ["extract", "--manifest", str(start_s_csv), "--model", "logmel", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.count("look like segment times") == 1 and "--columns start=start_s,end=end_s" in r.output
    mapped = tmp_path / "mapped.h5"
    r = runner.invoke(app, ["extract", "--manifest", str(start_s_csv), "--model", "logmel", "--out", str(mapped),
                            "--columns", "start=start_s,end=end_s,speaker=child_id,label=diagnosis,id=utt"])
    assert r.exit_code == 0, r.output
    assert "segment times" not in r.output
    with featstore.open(out) as a, featstore.open(mapped) as b:
        assert (a.column("segment_start_frame") == -1).all()
        assert a.attrs["manifest_sha256"] != b.attrs["manifest_sha256"]
        items = b.items
        assert list(items["id"]) == ["u0", "u1", "u2", "u3"] and list(items["label"]) == ["a", "b", "a", "b"]
        assert list(items["group"]) == ["k0", "k0", "k1", "k1"] and b.attrs["group_column"] == "child_id"
        assert (items["segment_end_frame"] > items["segment_start_frame"]).all()
    # the same segments as a manifest whose columns are called start/end
    renamed = write_manifest(tmp_path / "renamed.csv", [
        {"path": f"w{i}.wav", "start": [0.1, 0.15, 0.2, 0.25][i], "end": [0.3, 0.35, 0.4, 0.45][i]} for i in range(4)])
    ref = extract(renamed, "logmel", tmp_path / "ref.h5", progress=False)
    with featstore.open(ref.path) as c, featstore.open(mapped) as b:
        np.testing.assert_array_equal(c.column("segment_start_frame"), b.column("segment_start_frame"))
        np.testing.assert_array_equal(c.column("segment_end_frame"), b.column("segment_end_frame"))
    r = runner.invoke(app, ["extract", "--manifest", str(start_s_csv), "--model", "logmel", "--out", str(tmp_path / "x.h5"),
                            "--columns", "start=begin"])
    assert r.exit_code == 2 and "column mapping start=begin: no such column" in r.output and "Traceback" not in r.output

"""Regression tests for the hostile inputs of issue 17 and for what the fuzzers found (each failed
before its fix): a bad value costs its row only, a file that cannot be used ends the command with
one line that names it, and no traceback is ever printed."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import featstore
from featstore.audio import AudioError, load_audio, probe_duration
from featstore.fakestore import write_fake_store
from featstore.manifest import ManifestError, read_manifest
from featstore_cli.featstore_app import app as featstore_app
from featstore_cli.probes_app import app as probes_app

from .conftest import write_wav


@pytest.fixture()
def clips(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_wav(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(4000)).astype(np.float32))
    return tmp_path


def run_extract(manifest: Path, *extra: str, out: Path | None = None):
    out = out or manifest.with_suffix(".h5")
    res = CliRunner().invoke(featstore_app, ["extract", "--manifest", str(manifest), "--model", "logmel",
                                             "--out", str(out), *extra])
    escaped = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    assert escaped is None, f"{type(escaped).__name__}: {escaped}\n{res.output}"
    assert "Traceback" not in res.output
    return res, out


def statuses(store: Path) -> list[tuple[str, str, str]]:
    with featstore.open(store) as st:
        return list(zip(st.column("id"), st.column("status"), st.column("error")))


def only_second_row_bad(manifest: Path) -> tuple[str, Path]:
    """Extract a three-row manifest whose second row is defective: the run succeeds, rows 1 and 3
    are ok, row 2 is ``bad_row``; returns its error message and the store."""
    res, out = run_extract(manifest)
    assert res.exit_code == 0, res.output
    got = statuses(out)
    assert [s for _, s, _ in got] == ["ok", "bad_row", "ok"]
    assert got[1][0] == "b"
    return got[1][2], out


def error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# -- the defects named in the issue -----------------------------------------------------------
def test_a_field_longer_than_the_csv_limit_costs_its_row_only(clips):
    man = clips / "m.csv"
    man.write_text(f"path,label,remark\na.wav,x,ok\nb.wav,y,{'z' * 200_000}\nc.wav,x,ok\n")
    error, _ = only_second_row_bad(man)
    assert error.startswith("line 3: column 'remark' holds 200,000 characters")


@pytest.mark.parametrize("start,end", [("nan", "0.2"), ("0", "inf"), ("0", "1e999"), ("1e999", "2e999"), ("-inf", "0.1"),
                                       ("0", "1e300"), ("1e308", "1.7e308"), ("-1", "0.1"), ("0.2", "0.1")])
def test_a_non_finite_or_impossible_segment_costs_its_row_only(clips, start, end):
    man = clips / "m.csv"
    man.write_text(f"path,label,start,end\na.wav,x,0,0.1\nb.wav,y,{start},{end}\nc.wav,x,,\n")
    error, out = only_second_row_bad(man)
    assert error.startswith("line 3: ")
    with featstore.open(out) as st:
        assert list(st.column("num_frames") > 0) == [True, False, True]


def test_a_manifest_that_is_not_utf8_names_the_file_the_line_and_what_is_expected(clips):
    man = clips / "latin.csv"
    man.write_bytes("path,label\na.wav,x\nb.wav,caf\xe9\n".encode("latin-1"))
    res, _ = run_extract(man)
    assert res.exit_code == 2
    line = error_line(res.output)
    assert "latin.csv: line 3: not valid UTF-8 text (byte 0xe9 at offset 28)" in line and "save the file as UTF-8" in line
    png = clips / "image.csv"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    res, _ = run_extract(png)
    assert res.exit_code == 2 and "image.csv is not a text manifest (it looks like a PNG image" in error_line(res.output)


def test_reserved_column_names_stay_a_one_line_error(clips):
    man = clips / "m.csv"
    man.write_text("path,label,num_frames,status\na.wav,x,1,ok\n")
    res, _ = run_extract(man)
    assert res.exit_code == 2
    assert "m.csv: columns 'num_frames', 'status' are reserved" in error_line(res.output)
    assert "name already exists" not in res.output


# -- what the fuzzers found --------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_utf16_utf32_boms_and_line_endings(clips, encoding, newline):
    text = newline.join(["path,label,remark", "a.wav,Ünï,x", '"b.wav","音素","two', 'lines"', "c.wav,🙂,"]) + newline
    man = clips / "m.csv"
    man.write_bytes(text.encode(encoding))
    rows = read_manifest(man).rows
    assert [(r.line, r.label, r.status) for r in rows] == [(2, "Ünï", ""), (3, "音素", ""), (5, "🙂", "")]
    assert rows[1].extra["remark"] == f"two{newline}lines" if newline != "\r\n" else "two\r\nlines"


def test_line_numbers_are_physical_lines(clips):
    man = clips / "m.csv"
    man.write_text('path,label\n\na.wav,"x\ny"\n\nb.wav,y,surplus\nc.wav,z\n')
    rows = read_manifest(man).rows
    assert [(r.line, r.id, r.status) for r in rows] == [(3, "a", ""), (6, "line6", "bad_row"), (7, "c", "")]
    assert rows[1].error == "line 6: 3 fields, the header has 2 (path, label)"


def test_an_unclosed_quote_costs_its_row_only(clips):
    man = clips / "m.csv"
    man.write_text('path,label\na.wav,x\n"b.wav,y\nc.wav,z\n"a.wav"b,x\n')
    rows = read_manifest(man).rows
    assert [(r.line, r.id, r.status) for r in rows] == [(2, "a", ""), (3, "line3", "bad_row"), (4, "c", ""),
                                                        (5, "line5", "bad_row")]
    assert rows[1].error.startswith("line 3: has an unclosed quote")
    assert rows[3].error.startswith("line 5: breaks the CSV quoting rules")


def test_a_quote_closed_by_the_next_rows_quote_and_a_quoted_empty_row(clips):
    man = clips / "m.csv"
    man.write_text('remark,label,path\nok,x,a.wav\n",y,b.wav\n",z,c.wav\n""\n  \nok,w,b.wav\n')
    rows = read_manifest(man).rows
    assert [(r.line, r.id, r.status) for r in rows] == [(2, "a", ""), (3, "line3", "bad_row"), (4, "line4", "bad_row"),
                                                        (5, "line5", "bad_row"), (7, "b", "")]
    tsv = clips / "m.tsv"
    tsv.write_text("path\tlabel\na.wav\tx\n\t\n \n")  # a row of tabs is a row, a line of spaces is blank
    assert [(r.line, r.status, r.error) for r in read_manifest(tsv).rows] == [(2, "", ""), (3, "bad_row", "line 3: empty path")]
    assert rows[1].error.startswith("line 3: has an unclosed quote (it runs on to line 4)")
    assert rows[3].error == "line 5: 1 field, the header has 3 (remark, label, path)"


def test_a_nul_character_costs_its_row_only(clips):
    man = clips / "m.csv"
    man.write_bytes(b"path,label\na.wav,x\nb.wav,y\x00y\nc.wav,z\n")
    error, _ = only_second_row_bad(man)
    assert error == "line 3: column 'label' contains a NUL character"


def test_duplicate_and_unnamed_headers(clips):
    man = clips / "m.csv"
    man.write_text("path,label,label\na.wav,x,y\n")
    with pytest.raises(ManifestError, match=r"m.csv: the header names a column twice \('label' in columns 2, 3\)"):
        read_manifest(man)
    man.write_text("path,.,label\na.wav,x,y\n")
    with pytest.raises(ManifestError, match=r"m.csv: column name '\.' cannot be stored"):
        read_manifest(man)
    man.write_text("path,label,,\na.wav,x,,\n")  # trailing delimiters: no column
    assert read_manifest(man).extra_columns == []


def test_paths_that_are_not_audio_files(clips):
    d = clips
    (d / "folder.wav").mkdir()
    os.symlink(d / "loop2.wav", d / "loop1.wav")
    os.symlink(d / "loop1.wav", d / "loop2.wav")
    os.symlink(d / "gone" / "x.wav", d / "dangling.wav")
    os.mkfifo(d / "fifo.wav")
    cases = {"folder.wav": ("unreadable", "is a directory"), "loop1.wav": ("unreadable", "symbolic link loop"),
             "dangling.wav": ("missing", "broken symbolic link"), "fifo.wav": ("unreadable", "not a regular file"),
             "a.wav/x.wav": ("missing", "a folder on the path is a file"), "x" * 300 + ".wav": ("unreadable", "file name too long"),
             "nul\x00.wav": ("unreadable", "bad file name")}
    for name, (code, words) in cases.items():
        done: list = []

        def load(name=name):  # a FIFO blocked open() forever before: run it where a hang cannot stop the test
            try:
                load_audio(d / name, 16000)
            except AudioError as exc:
                done.append(exc)
            except BaseException as exc:  # noqa: BLE001
                done.append(exc)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        t.join(10)
        assert done, f"{name}: load_audio did not return"
        assert isinstance(done[0], AudioError), f"{name}: {type(done[0]).__name__}: {done[0]}"
        assert (done[0].code, words in done[0].message) == (code, True), (name, done[0].message)
        assert probe_duration(d / name) is None


def test_audio_headers_that_lie(clips):
    sf.write(str(clips / "one_hz.wav"), np.zeros(50, np.float32), 1, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"sample rate 1 Hz is not audio \(1000 Hz to 10 MHz\)"):
        load_audio(clips / "one_hz.wav", 16000)
    raw = bytearray((clips / "a.wav").read_bytes())  # the header's sample rate (bytes 24-27) says 800 MHz
    raw[24:28] = (800_000_000).to_bytes(4, "little")
    (clips / "fast.wav").write_bytes(bytes(raw))
    with pytest.raises(AudioError, match="sample rate 800000000 Hz is not audio"):  # resampled to 0 samples before
        load_audio(clips / "fast.wav", 16000)
    assert probe_duration(clips / "fast.wav") is None
    for start, end in ((0.0, float("inf")), (float("nan"), 1.0), (0.0, 1e300)):
        with pytest.raises(AudioError) as exc:
            load_audio(clips / "a.wav", 16000, start, end)
        assert exc.value.code == "bad_segment"


def test_paths_and_ids_with_rich_markup_are_printed_as_they_are(clips):
    man = clips / "m.csv"
    man.write_text("path,label\na.wav,x\n[/]gone.wav,y\n[red]x.wav,y\n")
    res, out = run_extract(man)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "]gone: missing file not found:" in text and "/[/]gone.wav" in text  # the id is the stem: "]gone"
    assert "[red]x: missing file not found:" in text and "/[red]x.wav" in text


def test_bad_batch_seconds_and_an_out_folder_are_usage_errors(clips):
    man = clips / "m.csv"
    man.write_text("path,label\na.wav,x\n")
    for value in ("nan", "inf", "-1", "0"):
        res, _ = run_extract(man, "--batch-seconds", value)
        assert res.exit_code == 2
        assert f"--batch-seconds must be a positive number of seconds, not {float(value)!r}" in error_line(res.output)
    res, _ = run_extract(man, out=clips / "folder")
    assert res.exit_code == 0  # a new name is fine ...
    (clips / "dir.h5").mkdir()
    res, _ = run_extract(man, out=clips / "dir.h5")
    assert res.exit_code == 2 and "dir.h5 is a directory: give the store's file name" in error_line(res.output)
    assert not (clips / "dir.h5.partial").exists()


def test_textgrids_with_point_tiers_bad_intervals_and_other_encodings(clips):
    head = 'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\ntiers? <exists>\nsize = 1\nitem []:\n'

    def tier(kind: str, body: str, n: int) -> str:
        return (f'    item [1]:\n        class = "{kind}"\n        name = "phones"\n        xmin = 0\n        xmax = 1\n'
                f'        {"points" if kind == "TextTier" else "intervals"}: size = {n}\n' + body)

    intervals = "".join(f"        intervals [{i}]:\n            xmin = {a}\n            xmax = {b}\n            text = \"s\"\n"
                        for i, (a, b) in enumerate([("0", "0.1"), ("nan", "0.2"), ("0.2", "inf"), ("-1", "0.3")], 1))
    (clips / "a.TextGrid").write_text(head + tier("IntervalTier", intervals, 4))
    (clips / "b.TextGrid").write_text(head + tier("TextTier", '        points [1]:\n            number = 0.1\n'
                                                  '            mark = "s"\n', 1))
    (clips / "c.TextGrid").write_bytes((head + tier("IntervalTier", intervals.split("        intervals [2]")[0], 1)
                                        ).replace("\n", "\r\n").encode("utf-16-le"))
    man = clips / "m.csv"
    man.write_text("path,label\na.wav,x\nb.wav,y\nc.wav,z\n")
    rows = read_manifest(man, textgrid_tier="phones")
    got = [(r.id, r.status, r.start) for r in rows.rows]
    assert got == [("a_000", "", 0.0), ("a_001", "bad_segment", None), ("a_002", "bad_segment", None),
                   ("a_003", "bad_segment", None), ("b", "no_textgrid", None), ("c_000", "", 0.0)]
    errors = [r.error for r in rows.rows]
    assert errors[1] == "line 2: interval 2 of tier 'phones' in a.TextGrid: start/end must be finite numbers of seconds (nan, 0.2)"
    assert errors[4] == "line 3: tier 'phones' of b.TextGrid is a point tier (segments need an interval tier)"
    (clips / "a.TextGrid").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.remove(clips / "b.TextGrid")
    os.mkfifo(clips / "b.TextGrid")
    rows = read_manifest(man, textgrid_tier="phones").rows
    assert rows[0].error.startswith("line 2: a.TextGrid is not a text TextGrid (it looks like a PNG image")
    assert rows[1].error == "line 3: b.TextGrid is not a regular file (a FIFO, device or socket)"


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("stores") / "good.h5", n_speakers=8, items_per_speaker=4,
                            num_layers=2, dim=4, informative_layers=(1,))


def _damaged(good: Path, d: Path, kind: str) -> Path:
    p = d / f"{kind}.h5"
    raw = good.read_bytes()
    if kind == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
        return p
    if kind == "partial":
        p = d / "run.h5.partial"
        p.mkdir()
        return p
    shutil.copy(good, p)
    with h5py.File(p, "r+") as h5:
        if kind == "version2":
            h5.attrs["format_version"] = 2
        elif kind == "items_shorter":  # an items table shorter than its layers
            for name in list(h5["items"]):
                data = h5["items"][name][:]
                del h5["items"][name]
                h5["items"].create_dataset(name, data=data[:10], dtype=h5py.string_dtype() if data.dtype == object else data.dtype)
        elif kind == "column_shorter":
            data = h5["items/label"][:]
            del h5["items/label"]
            h5["items"].create_dataset("label", data=data[:5], dtype=h5py.string_dtype())
    return p


@pytest.mark.parametrize("kind,words", [
    ("truncated", "is not a readable featstore file: HDF5 cannot open it (truncated file"),
    ("version2", "has format_version 2; this featstore reads version 1"),
    ("partial", "is a directory, not a store file (the batch directory of an unfinished run)"),
    ("items_shorter", "is damaged: its 10 items own frames up to row 85 but layers/ holds 261: the items table is shorter"),
    ("column_shorter", "is damaged: items/label has 5 rows but items/id has 32"),
])
def test_damaged_stores_handed_to_probes_give_one_line_naming_the_file(good_store, tmp_path, kind, words):
    path = _damaged(good_store, tmp_path, kind)
    for cmd in (["sweep", str(path), "--probe", "logreg", "--pooling", "mean", "--class-weight", "none", "--cv", "2",
                 "--n-jobs", "1", "--no-report", "--no-progress", "--out", str(tmp_path / "sweep")],
                ["fit", str(path), "--layer", "1", "--out", str(tmp_path / "m.joblib")]):
        res = CliRunner().invoke(probes_app, cmd)
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.exit_code == 2 and "Traceback" not in res.output
        line = error_line(res.output)
        assert str(path) in line and words in line, line
    assert featstore.check_store(path)  # `featstore check` still lists the problems


def test_the_installed_command_on_a_hostile_manifest(clips):
    """The real entry point (a subprocess, as a user runs it): bad rows cost their row, and no
    traceback is printed (exit 2 for a manifest that cannot be used is checked in-process above)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    man = clips / "m.csv"
    man.write_bytes("path,label,start,end\na.wav,x,0,inf\n\"b.wav,y,,\nc.wav,z,,\n".encode("utf-16"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    for path, code, words in ((man, 0, "a: bad_row line 2: start/end must be finite"),):
        proc = subprocess.run([sys.executable, "-m", "cli.featstore_app", "extract", "--manifest", str(path), "--model",
                               "logmel", "--out", str(path.with_suffix(".h5"))], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        text = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode == code and "Traceback" not in text and words in text, text[-1000:]
    assert [s for _, s, _ in statuses(man.with_suffix(".h5"))] == ["bad_row", "bad_row", "ok"]

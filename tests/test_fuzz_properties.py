"""Property tests (hypothesis) of every input surface: manifest files, audio headers and payloads,
TextGrids, store files handed to ``probes``, the CLIs' option values, and whole hostile manifests
end to end through ``featstore extract``.

The property: the command ends with exit code 0, 1 or 2 as the README documents, no exception
escapes and no traceback is printed; a file that cannot be used gives one ``error:`` line naming
it; every valid row is processed and every invalid row gets a status and a message naming its
line or file. Examples are derandomized (profile ``featstore-fuzz``) and bounded, so CI is
deterministic; all of this file takes well under a minute.
"""
from __future__ import annotations

import importlib.util
import io
import math
import random
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

import hypothesis  # in the test extra (pyproject): these properties must run wherever the suite runs
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from featstore.audio import AudioError, load_audio, probe_duration  # noqa: E402
from featstore.fakestore import write_fake_store  # noqa: E402
from featstore.manifest import MAX_FIELD, MAX_SECONDS, ManifestError, read_manifest  # noqa: E402
from featstore_cli.featstore_app import app as featstore_app  # noqa: E402
from featstore_cli.probes_app import app as probes_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
settings.register_profile(
    "featstore-fuzz", derandomize=True, deadline=None, max_examples=50, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("featstore-fuzz")


def _bench():
    spec = importlib.util.spec_from_file_location("fuzz_bench", ROOT / "bench" / "fuzz_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_bench", module)
    spec.loader.exec_module(sys.modules["fuzz_bench"])
    return sys.modules["fuzz_bench"]


fuzz_bench = _bench()


def escaped(res) -> BaseException | None:
    return res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None


def assert_clean_exit(res, allowed=(0, 1, 2)) -> None:
    exc = escaped(res)
    assert exc is None, f"{type(exc).__name__}: {exc}\n{res.output[-2000:]}"
    assert "Traceback" not in res.output
    assert res.exit_code in allowed, res.output[-2000:]
    if res.exit_code == 2:  # ours ("error: ...") or click's usage error ("Error: ...")
        assert "error" in res.output.lower(), res.output[-2000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    fuzz_bench.make_good_clips(d / "good")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        sf.write(str(d / f"{name}.wav"), (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000)
    return d


# -- manifest files -------------------------------------------------------------------------------
TOKENS = [",", ",", ";", "\t", '"', '"', "\n", "\n", "\r", "\r\n", " ", "path", "label", "start", "end", "id", "speaker",
          "a.wav", "b.wav", "gone.wav", "nan", "inf", "-inf", "1e999", "-1", "0.1", "0", "0.2", "1e308", "x", "é",
          "\x00", "\ufeff", "音", "[/]", "offset", "status", "group", "."]
HEADERS = ["path,label,start,end\n", "path,label\n", "id,path,label,speaker,start,end\n", "path\tlabel\tstart\tend\n", ""]


@st.composite
def manifest_bytes(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    text = draw(st.sampled_from(HEADERS)) + "".join(draw(st.lists(st.sampled_from(TOKENS), max_size=80)))
    if draw(st.booleans()):
        text += "x" * draw(st.sampled_from([MAX_FIELD - 10, MAX_FIELD + 1]))
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"]))
    raw = text.encode(enc, errors="replace")
    if draw(st.integers(0, 4)) == 0 and raw:  # a few bytes overwritten
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at + 3:]
    return raw


@settings(FUZZ, max_examples=300)
@given(raw=manifest_bytes(), suffix=st.sampled_from([".csv", ".tsv", ".txt"]))
def test_the_manifest_reader_gives_a_status_to_every_row_or_one_error_naming_the_file(work, raw, suffix):
    path = work / f"fuzzed{suffix}"
    path.write_bytes(raw)
    try:
        man = read_manifest(path)
    except ManifestError as exc:
        assert path.name in str(exc) and "\n" not in str(exc)
        return
    n_lines = max(1, raw.count(b"\n") + raw.count(b"\r") + 1)
    ids = set()
    for row in man.rows:
        assert 2 <= row.line <= n_lines
        values = [row.id, row.path, row.label, row.group, *row.extra.values()]
        assert all("\x00" not in v and len(v) <= MAX_FIELD for v in values), row  # the store can hold them
        if row.status:
            assert row.error.startswith(f"line {row.line}: ") or row.status == "duplicate_id", row
            continue
        assert row.path and row.id not in ids
        ids.add(row.id)
        if row.start is not None:
            assert math.isfinite(row.start) and math.isfinite(row.end) and 0 <= row.start < row.end <= MAX_SECONDS


# -- audio headers and payloads ---------------------------------------------------------------------
SUBTYPES = {"WAV": ["PCM_16", "PCM_24", "PCM_U8", "FLOAT", "DOUBLE", "ULAW", "ALAW"], "FLAC": ["PCM_16", "PCM_24"],
            "AIFF": ["PCM_16", "FLOAT"], "OGG": ["VORBIS"]}


@st.composite
def audio_bytes(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([b"", b"RIFF", b"fLaC", b"OggS", b"FORM", b"\x89PNG"])) + draw(st.binary(max_size=300))
    fmt = draw(st.sampled_from(sorted(SUBTYPES)))
    subtype = draw(st.sampled_from(SUBTYPES[fmt]))
    sr = draw(st.sampled_from([1, 10, 999, 1000, 8000, 16000, 44100, 192000]))
    ch = draw(st.integers(1, 4))
    n = draw(st.integers(0, 3000))
    # NaN/inf/1e30 only where the file can hold them (libsndfile's Vorbis encoder crashes on them)
    kind = draw(st.sampled_from(["zeros", "noise", "nan", "inf", "huge"] if subtype in ("FLOAT", "DOUBLE") else
                                ["zeros", "noise"]))
    x = np.zeros((n, ch), np.float32) if kind == "zeros" else np.random.default_rng(n).standard_normal((n, ch)).astype(np.float32)
    if n and kind in ("nan", "inf"):
        x[draw(st.integers(0, n - 1)), 0] = np.nan if kind == "nan" else np.inf
    if kind == "huge":
        x *= 1e30
    buf = io.BytesIO()
    try:
        sf.write(buf, x, sr if fmt != "OGG" else max(sr, 8000), format=fmt, subtype=subtype)
    except Exception:  # noqa: BLE001 - a combination libsndfile refuses to write: take raw bytes instead
        return draw(st.binary(max_size=100))
    raw = bytearray(buf.getvalue())
    cut = draw(st.sampled_from(["none", "none", "truncate", "overwrite", "claim"]))
    if cut == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif cut == "overwrite" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw[at:at + 4] = draw(st.binary(min_size=4, max_size=4))
    elif cut == "claim" and b"data" in raw:  # the WAV data chunk claims another size
        at = raw.find(b"data")
        raw[at + 4:at + 8] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
    return bytes(raw)


TIMES = st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.1, 1.0, -1.0, float("nan"), float("inf"), 1e300]))


@settings(FUZZ, max_examples=150)
@given(raw=audio_bytes(), start=TIMES, end=TIMES)
def test_the_audio_loader_returns_a_clip_or_a_status_whatever_the_file_holds(work, raw, start, end):
    path = work / "fuzzed.wav"
    path.write_bytes(raw)
    dur = probe_duration(path)
    assert dur is None or (math.isfinite(dur) and dur >= 0)
    if start is not None and end is None:
        end = start + 0.1
    if start is None:
        end = None
    try:
        clip = load_audio(path, 16000, start, end)
    except AudioError as exc:
        assert exc.code in {"unreadable", "empty", "nan", "bad_segment"}, exc.code
        assert path.name in exc.message and "\n" not in exc.message
        return
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1 and len(clip.samples) > 0
    assert np.isfinite(clip.samples).all() and clip.sample_rate == 16000


# -- TextGrids -------------------------------------------------------------------------------------------
HOSTILE_TIMES = st.sampled_from(["nan", "inf", "-inf", "-1", "1e999", "abc", "", "0.3", "2"])
VALID_INTERVAL = st.tuples(st.sampled_from(["0", "0.05", "0.1", "0.2"]), st.sampled_from([0.05, 0.1])).map(
    lambda t: (t[0], str(round(float(t[0]) + t[1], 3))))
INTERVAL_TIMES = st.one_of(VALID_INTERVAL, VALID_INTERVAL, VALID_INTERVAL, st.tuples(HOSTILE_TIMES, HOSTILE_TIMES))
TEXTS = st.sampled_from(["s", "s", "z", "", "sh", 's"', "\x00", "音", "x" * 10])


@st.composite
def textgrid_bytes(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    point = draw(st.integers(0, 5)) == 0
    ivs = [(a, b, t) for (a, b), t in draw(st.lists(st.tuples(INTERVAL_TIMES, TEXTS), max_size=5))]
    long = draw(st.booleans())
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', ""]
    kind = "TextTier" if point else "IntervalTier"
    if long:
        lines += ["xmin = 0", "xmax = 1", "tiers? <exists>", "size = 1", "item []:", "    item [1]:",
                  f'        class = "{kind}"', f'        name = "{draw(st.sampled_from(["phones", "words"]))}"',
                  "        xmin = 0", "        xmax = 1", f"        {'points' if point else 'intervals'}: size = {len(ivs)}"]
        for i, (a, b, t) in enumerate(ivs, 1):
            lines += ([f"        points [{i}]:", f"            number = {a}", f'            mark = "{t}"'] if point else
                      [f"        intervals [{i}]:", f"            xmin = {a}", f"            xmax = {b}", f'            text = "{t}"'])
    else:
        lines += ["0", "1", "<exists>", "1", f'"{kind}"', '"phones"', "0", "1", str(len(ivs))]
        for a, b, t in ivs:
            lines += ([a, f'"{t}"'] if point else [a, b, f'"{t}"'])
    text = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines) + "\n"
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    enc = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-16-le"]))
    return text.encode(enc)


@settings(FUZZ, max_examples=150)
@given(raw=textgrid_bytes(), labels=st.sampled_from([None, ["s"], ["s", "z"]]))
def test_textgrid_segments_are_valid_or_the_row_has_a_status(work, raw, labels):
    (work / "a.TextGrid").write_bytes(raw)
    man = work / "tg.csv"
    man.write_text("path,label\na.wav,x\n")
    rows = read_manifest(man, textgrid_tier="phones", textgrid_labels=labels).rows
    assert rows
    for row in rows:
        if row.status:
            assert row.error.startswith("line 2: ") and "TextGrid" in row.error and "\n" not in row.error, row.error
            assert row.start is None
        else:
            assert math.isfinite(row.start) and math.isfinite(row.end) and 0 <= row.start < row.end
            assert "\x00" not in row.extra["segment_label"]


# -- store files handed to probes ------------------------------------------------------------------------
def _mutate(good: Path, path: Path, kind: str, k: int, value: int) -> None:
    raw = good.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: k % len(raw)])
        return
    if kind == "overwrite_superblock":  # the HDF5 signature and superblock live in the first bytes
        b = bytearray(raw)
        b[k % 64] = value % 256
        path.write_bytes(bytes(b))
        return
    shutil.copy(good, path)
    with h5py.File(path, "r+") as h5:
        items = h5["items"]
        cols = sorted(items)
        col = cols[k % len(cols)]
        if kind == "drop_column":
            del items[col]
        elif kind == "shorten_column":
            data = items[col][:]
            del items[col]
            items.create_dataset(col, data=data[: value % len(data)], dtype=h5py.string_dtype() if data.dtype == object else data.dtype)
        elif kind == "column_as_floats":
            n = items[col].shape[0]
            del items[col]
            items.create_dataset(col, data=np.full(n, np.nan))
        elif kind == "format_version":
            h5.attrs["format_version"] = value - 5
        elif kind == "drop_attr":
            names = sorted(h5.attrs)
            del h5.attrs[names[k % len(names)]]
        elif kind == "num_frames":
            items["num_frames"][k % items["num_frames"].shape[0]] = value - 10
        elif kind == "offset":
            items["offset"][k % items["offset"].shape[0]] = value * 1000 - 5
        elif kind == "shorten_layer":
            ds = h5["layers/00"]
            data = ds[:]
            del h5["layers/00"]
            h5["layers"].create_dataset("00", data=data[: value % len(data)])


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("store") / "good.h5", n_speakers=8, items_per_speaker=4,
                            num_layers=2, dim=4, informative_layers=(1,))


@settings(FUZZ, max_examples=40)
@given(kind=st.sampled_from(["truncate", "overwrite_superblock", "drop_column", "shorten_column", "column_as_floats",
                             "format_version", "drop_attr", "num_frames", "offset", "shorten_layer"]),
       k=st.integers(0, 10**6), value=st.integers(0, 255))
def test_a_damaged_store_gives_probes_one_line_naming_it(fake_store, tmp_path_factory, kind, k, value):
    d = tmp_path_factory.mktemp("damaged")
    path = d / "damaged.h5"
    _mutate(fake_store, path, kind, k, value)
    # `fit` opens the store as `sweep`, `doctor` and `analyze` do (tests/test_fuzz_regressions.py runs `sweep`)
    res = CliRunner().invoke(probes_app, ["fit", str(path), "--layer", "1", "--out", str(d / "model.joblib")])
    assert_clean_exit(res, allowed=(0, 2))
    if res.exit_code == 2:
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "damaged.h5" in errors[0], res.output


# -- the CLIs' option values ---------------------------------------------------------------------------
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8)
NUMBER = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e999", "-1", "0", "1e-300", "1e300", "abc", "", "0x10"]), TEXT)
INTEGER = st.one_of(st.sampled_from(["-1", "0", "1", "2", "1000", "99999999999999999999", "1.5", "nan", ""]), TEXT)
LIST = st.one_of(st.sampled_from(["", ",", ",,", "all", "[/]", "a,b", "x" * 200, "\x1b[31m"]), TEXT)
SPEC = st.one_of(st.sampled_from(["all", "0-", "-5", "99", "0-99", "1-0", "0,0", "-1", "", ",", "0/0", "1/0", "2/1",
                                  "1/1", "x/y", "a=b", "=", "path=label", "start=end", "speaker=nope"]), TEXT)
EXTRACT_OPTIONS = {"--batch-seconds": NUMBER, "--context-seconds": NUMBER, "--layers": SPEC, "--shard": SPEC,
                   "--columns": SPEC, "--dtype": LIST, "--amp": LIST, "--device": LIST, "--textgrid-tier": LIST,
                   "--textgrid-labels": LIST, "--group-column": LIST, "--manifest-format": LIST, "--split": LIST}
SWEEP_OPTIONS = {"--cv": INTEGER, "--inner-cv": INTEGER, "--n-boot": INTEGER, "--seed": INTEGER, "--layers": SPEC,
                 "--scope": LIST, "--pooling": LIST, "--probe": LIST, "--class-weight": LIST, "--nested": LIST,
                 "--label-map": SPEC}


def assert_error_names(res, option: str, value: str, *also: str) -> None:
    """A usage error (exit 2) says which option, value or file it is about."""
    if res.exit_code != 2:
        return
    text = " ".join(res.output.split())
    word = max(option.lstrip("-").split("-"), key=len).rstrip("s")
    assert (word.lower() in text.lower() or (value.strip() and value in text)
            or any(a in text for a in also)), f"{option} {value!r}: {text[-300:]}"


@pytest.mark.parametrize("option", sorted(EXTRACT_OPTIONS))
def test_featstore_extract_option_values(work, option):
    man = work / "opts.csv"
    man.write_text("path,label,speaker\na.wav,x,s1\nb.wav,y,s2\n")

    @settings(FUZZ, max_examples=8)
    @given(value=EXTRACT_OPTIONS[option])
    def check(value):
        res = CliRunner().invoke(featstore_app, ["extract", "--manifest", str(man), "--model", "logmel", "--out",
                                                 str(work / "opts.h5"), "--overwrite", option, value])
        assert_clean_exit(res)
        assert_error_names(res, option, value, man.name)

    check()


@pytest.mark.parametrize("option", sorted(SWEEP_OPTIONS))
def test_probes_sweep_option_values(fake_store, tmp_path_factory, option):
    out = tmp_path_factory.getbasetemp() / "sweep-options"

    @settings(FUZZ, max_examples=5)
    @given(value=SWEEP_OPTIONS[option])
    def check(value):
        res = CliRunner().invoke(probes_app, ["sweep", str(fake_store), "--probe", "logreg", "--pooling", "mean",
                                              "--class-weight", "none", "--cv", "2", "--n-jobs", "1", "--n-boot", "10",
                                              "--nested", "off", "--no-report", "--no-progress", "--out", str(out),
                                              option, value])
        assert_clean_exit(res, allowed=(0, 2))
        assert_error_names(res, option, value, fake_store.name)

    check()


# -- whole hostile manifests, end to end ---------------------------------------------------------------
@settings(FUZZ, max_examples=40)
@given(rng=st.randoms(use_true_random=False))
def test_hostile_manifests_end_to_end(work, rng):
    case = fuzz_bench.make_case(rng, work, work / "good")
    try:
        problems = fuzz_bench.check_case(case, *fuzz_bench.run_cli(case))
        assert not problems, f"{case.defects} {case.fatal} {case.fmt}: {problems}"
    finally:
        shutil.rmtree(case.dir, ignore_errors=True)


def test_the_benchmark_cases_are_reproducible(work):
    a = fuzz_bench.make_case(random.Random(5), work, work / "good")
    b = fuzz_bench.make_case(random.Random(5), work, work / "good")
    assert a.manifest.read_bytes() == b.manifest.read_bytes() and a.defects == b.defects
    shutil.rmtree(a.dir)
    shutil.rmtree(b.dir)

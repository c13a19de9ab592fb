"""Fuzz benchmark of `featstore extract`: N random hostile manifests, end to end through the CLI.

Each case is a manifest that mixes real clips with one or more defects — of the manifest file
(encodings and byte-order marks, line endings, quoting, blank lines, delimiters, headers that are
reserved, duplicated or missing a ``path`` column, binary or non-UTF-8 bytes), of a row (numbers
that are ``nan``/``inf``/``1e999``/negative/reversed, fields over 131,072 characters, NUL
characters, ragged rows, unclosed quotes, empty paths, duplicate ids) or of the audio a row names
(missing, a directory, a symlink loop, a FIFO, a PNG renamed ``.wav``, a truncated header, no
samples, NaN samples, too short for one frame, a 10 Hz header) — and is run with the in-process
CLI (typer's ``CliRunner``, ``featstore extract --model logmel``). A case is *clean* when:

* the command ends with exit code 0, or 2 for a manifest that cannot be used at all (README,
  "Exit codes"), no exception escapes and no traceback is printed;
* exit 2 prints one ``error:`` line that names the manifest file;
* exit 0 leaves a store with one item per manifest row, in order: every valid row ``ok`` with
  frames, its id and label as written (so quoting and encodings were read right), and every
  invalid row with a status from the expected ones, a message (``line N`` for a bad row) and a
  line ``<id>: <status>`` in the run's summary.

    python bench/fuzz_bench.py            # 1000 cases
    python bench/fuzz_bench.py --n 50 --seed 7

Prints one line per failing case (its seed and what broke) and ends with ``K/N clean``.
:func:`make_case` and :func:`check_case` are also what ``tests/test_fuzz_extract.py`` runs, under
hypothesis (``random.Random`` or hypothesis' ``randoms()``: both work).
"""
from __future__ import annotations

import argparse
import codecs
import csv
import io
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SR = 16000

#: good clips every case may use: name -> (seconds, sample rate, channels, subtype, format)
GOOD_CLIPS = {
    "g16k.wav": (0.25, 16000, 1, "FLOAT", "WAV"),
    "g8k.wav": (0.2, 8000, 1, "PCM_16", "WAV"),
    "g44st.wav": (0.15, 44100, 2, "PCM_16", "WAV"),
    "g16k.flac": (0.3, 16000, 1, "PCM_16", "FLAC"),
    "g22.wav": (0.12, 22050, 1, "PCM_24", "WAV"),
    "sp ace,comma.wav": (0.2, 16000, 1, "PCM_16", "WAV"),
    "üñí-çødé.wav": (0.2, 16000, 1, "PCM_16", "WAV"),
}

#: row defects: name -> statuses the row may end with
ROW_DEFECTS: dict[str, set[str]] = {
    "missing_file": {"missing"},
    "directory": {"unreadable"},
    "symlink_loop": {"unreadable"},
    "dangling_symlink": {"missing"},
    "fifo": {"unreadable"},
    "through_a_file": {"missing"},
    "markup_in_path": {"missing"},
    "long_path": {"unreadable"},
    "empty_path": {"bad_row"},
    "only_delimiters": {"bad_row"},
    "zero_byte_file": {"unreadable"},
    "png_as_wav": {"unreadable"},
    "random_bytes": {"unreadable"},
    "truncated_header": {"unreadable"},
    "no_samples": {"empty", "unreadable"},
    "nan_samples": {"nan"},
    "too_short": {"too_short"},
    "tiny_rate": {"unreadable"},
    "duplicate_id": {"duplicate_id"},
    "bad_number": {"bad_row"},
    "segment_after_end": {"bad_segment"},
    "huge_field": {"bad_row"},
    "nul_in_field": {"bad_row"},
    "ragged_more": {"bad_row"},
    "ragged_less": {"bad_row"},
    "unclosed_quote": {"bad_row"},
    "text_after_quote": {"bad_row"},
}
#: manifest defects: the command must stop with exit 2 and one line naming the manifest
FATAL_DEFECTS = ("duplicate_header", "reserved_header", "no_path_column", "binary_file", "latin1_byte",
                 "empty_file", "header_only", "empty_header_name", "dot_header")
BAD_NUMBERS = [("nan", "0.1"), ("0", "nan"), ("inf", "1"), ("0", "inf"), ("-inf", "0.1"), ("1e999", "2e999"),
               ("0", "1e999"), ("-1", "0.1"), ("0.2", "0.1"), ("0.1", "0.1"), ("abc", "0.1"), ("0", ""), ("", "0.1"),
               ("0", "1e300"), ("1e308", "1.7e308"), ("0x10", "0x20"), ("-0.5", "-0.1"), ("NaN", "NaN")]
LABELS = ["Normal", "Lateral", "Interdental", "", "mit Leerzeichen", 'say "s"', "a,b", "ünï", "音素", "x\ny", "🙂",
          "  padded  ", "semi;colon", "tab\there"]


@dataclass
class Expect:
    """One manifest row as the store must hold it."""

    id: str
    label: str
    line: int
    ok: bool
    statuses: set[str] = field(default_factory=set)
    defect: str = ""


@dataclass
class Case:
    seed: Any
    dir: Path
    manifest: Path
    rows: list[Expect]
    defects: list[str]
    fatal: str = ""  # the manifest defect that must end the command with exit 2
    fmt: dict[str, Any] = field(default_factory=dict)

    @property
    def expect_exit(self) -> int:
        return 2 if self.fatal else 0


def make_good_clips(folder: Path) -> Path:
    """Write :data:`GOOD_CLIPS` into ``folder`` (once)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (sec, sr, ch, subtype, fmt) in GOOD_CLIPS.items():
        p = folder / name
        if not p.exists():
            x = 0.1 * rng.standard_normal((int(sec * sr), ch)).astype(np.float32)
            sf.write(str(p), x, sr, subtype=subtype, format=fmt)
    return folder


def _wav_bytes(n: int, sr: int = SR, data_claim: int | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(n, np.float32), sr, format="WAV", subtype="PCM_16")
    raw = bytearray(buf.getvalue())
    if data_claim is not None:
        at = raw.find(b"data")
        raw[at + 4:at + 8] = int(data_claim).to_bytes(4, "little")
    return bytes(raw)


def _hostile_file(kind: str, k: int, d: Path, rng: Any, good: Path) -> str:
    """Create what the ``k``-th defect row, of kind ``kind``, points at; returns the path as written
    in the manifest (its stem is unique in the case)."""
    name = f"{kind}_{k}.wav"
    p = d / name
    if kind == "missing_file":
        return name
    if kind == "directory":
        p.mkdir()
    elif kind == "symlink_loop":
        os.symlink(d / (name + ".b"), p)
        os.symlink(p, d / (name + ".b"))
    elif kind == "dangling_symlink":
        os.symlink(d / "nowhere" / "x.wav", p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "through_a_file":
        return str(Path("../good") / "g16k.wav" / name)
    elif kind == "markup_in_path":
        return f"[/]{rng.choice(['', '[bold]', '[/red]'])}{name}"
    elif kind == "long_path":
        return f"{k}" + "x" * rng.randint(300, 5000) + ".wav"
    elif kind == "zero_byte_file":
        p.write_bytes(b"")
    elif kind == "png_as_wav":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.randint(0, 255) for _ in range(64)))
    elif kind == "random_bytes":
        p.write_bytes(b"\xff\x00" + bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 300))))
    elif kind == "truncated_header":
        p.write_bytes(_wav_bytes(4000)[: rng.randint(1, 40)])
    elif kind == "no_samples":
        p.write_bytes(_wav_bytes(0))
    elif kind == "nan_samples":
        x = np.zeros(4000, np.float32)
        x[rng.randint(0, 3999)] = float(rng.choice(["nan", "inf", "-inf"]))
        sf.write(str(p), x, SR, subtype="FLOAT")
    elif kind == "too_short":
        sf.write(str(p), np.zeros(rng.randint(1, 399), np.float32), SR, subtype="FLOAT")
    elif kind == "tiny_rate":
        p.write_bytes(_wav_bytes(50, sr=rng.choice([1, 10, 100, 999])))
    else:  # pragma: no cover
        raise ValueError(kind)
    return name


def make_case(rng: Any, root: Path, good: Path, seed: Any = None) -> Case:
    """A random hostile manifest in a new folder under ``root``, with what a clean run must give.

    ``rng``: ``random.Random`` (the benchmark) or hypothesis' ``randoms()`` (the tests);
    ``good``: the folder of :func:`make_good_clips` (used as ``../good/<name>``).
    """
    d = Path(tempfile.mkdtemp(prefix="case", dir=root))
    fmt = {
        "delimiter": rng.choice([",", ",", "\t", ";"]),
        "encoding": rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le-nobom", "utf-32"]),
        "newline": rng.choice(["\n", "\r\n", "\r"]),
        "quote_all": rng.random() < 0.3,
        "blank_lines": rng.random() < 0.3,
        "trailing_newline": rng.random() < 0.8,
        "id_column": rng.random() < 0.7,
        "segments": rng.random() < 0.4,
        "extra": rng.random() < 0.5,
        "header_spaces": rng.random() < 0.2,
        "trailing_delimiter": rng.random() < 0.15,
    }
    suffix = {",": rng.choice([".csv", ".txt"]), "\t": rng.choice([".tsv", ".txt"]), ";": ".txt"}[fmt["delimiter"]]
    manifest = d / f"manifest{suffix}"
    n_defects = rng.choice([1, 1, 2, 3])
    fatal = rng.choice(FATAL_DEFECTS) if rng.random() < 0.15 else ""
    defects = [rng.choice(sorted(ROW_DEFECTS)) for _ in range(n_defects)]
    quoting_defects = {"unclosed_quote", "text_after_quote"}
    if any(x in quoting_defects for x in defects):
        fmt["quote_all"] = False  # a stray quote would pair with the next quoted field
    if "bad_number" in defects or "segment_after_end" in defects:
        fmt["segments"] = True
    if "duplicate_id" in defects:
        fmt["id_column"] = True
    header = ["path", "label", "speaker"]
    if fmt["id_column"]:
        header.insert(rng.randint(0, len(header)), "id")
    if fmt["segments"]:
        header += ["start", "end"]
    if fmt["extra"]:
        header += ["sex", "remark"]
    rng.shuffle(header)

    rows: list[tuple[dict[str, str], Expect]] = []
    names = sorted(GOOD_CLIPS)
    used_stems: set[str] = set()
    n_good = rng.randint(1, 4)
    for i in range(n_good):
        clip = rng.choice(names)
        if not fmt["id_column"]:
            free = [c for c in names if Path(c).stem not in used_stems]
            clip = rng.choice(free)
        used_stems.add(Path(clip).stem)
        rid = f"good{i}_{rng.randint(0, 999)}" if fmt["id_column"] else Path(clip).stem
        label = rng.choice(LABELS).strip()
        if any(x in quoting_defects for x in defects):
            label = label.replace('"', "")
        rec = {"path": str(Path("..") / "good" / clip) if rng.random() < 0.7 else str(good / clip),
               "label": label, "speaker": f"spk{rng.randint(0, 3)}", "id": rid, "sex": rng.choice(["F", "M", ""]),
               "remark": rng.choice(["", "ok", "comma, inside", "x" * rng.randint(0, 2000)])}
        if fmt["segments"]:
            sec = GOOD_CLIPS[clip][0]
            if rng.random() < 0.7:
                a = round(rng.uniform(0, sec * 0.5), 3)
                rec["start"], rec["end"] = str(a), str(round(a + rng.uniform(0.02, sec * 0.5), 3))
            else:
                rec["start"] = rec["end"] = ""
        rows.append((rec, Expect(rid, label, 0, True)))
    for k, kind in enumerate(defects):
        rid = f"bad{k}_{kind}"
        # a real clip under a name of its own (without an id column the id is the file's stem)
        own = d / f"{rid}.wav"
        shutil.copy(good / "g16k.wav", own)
        rec = {"path": own.name, "label": "Normal", "speaker": "spk9", "id": rid, "sex": "F", "remark": "",
               "start": "", "end": ""}
        if kind in ("missing_file", "directory", "symlink_loop", "dangling_symlink", "fifo", "through_a_file",
                    "markup_in_path", "long_path", "zero_byte_file", "png_as_wav", "random_bytes", "truncated_header",
                    "no_samples", "nan_samples", "too_short", "tiny_rate"):
            rec["path"] = _hostile_file(kind, k, d, rng, good)
        elif kind in ("empty_path", "only_delimiters"):
            rec["path"] = ""
        elif kind == "duplicate_id":
            rid = rows[0][1].id
            rec["id"] = rid
        elif kind == "bad_number":
            rec["start"], rec["end"] = rng.choice(BAD_NUMBERS)
        elif kind == "segment_after_end":
            rec["start"], rec["end"] = "50", "51"
        elif kind == "huge_field":
            where = rng.choice([c for c in header if c not in ("start", "end")])
            rec[where] = "z" * rng.randint(131073, 200000)
            if where == "id":
                rid = None  # the store names such a row "line<N>"
        elif kind == "nul_in_field":
            where = rng.choice([c for c in header if c not in ("start", "end")])
            rec[where] = rec[where][:3] + "\x00" + "x"
            if where == "id":
                rid = None
        if kind in ("only_delimiters", "ragged_more", "ragged_less", "unclosed_quote", "text_after_quote"):
            rid = None  # fields that cannot be trusted: the row is named line<N>
        elif not fmt["id_column"] and rid is not None and kind != "duplicate_id":
            # without an id column the id is the file stem (line<N> for an empty or broken path)
            rid = Path(rec["path"]).stem if rec["path"] and kind not in ("huge_field", "nul_in_field") else None
            if kind in ("huge_field", "nul_in_field") and where != "path":
                rid = Path(rec["path"]).stem
        rows.append((rec, Expect(rid or "", rec["label"], 0, False, set(ROW_DEFECTS[kind]), kind)))
    # the defect rows go anywhere, but a duplicate id after its first use
    first = rows[0]
    rest = rows[1:]
    rng.shuffle(rest)
    rows = [first] + rest

    # -- serialise, tracking each row's physical line ------------------------------------------
    nl, delim = fmt["newline"], fmt["delimiter"]

    def line_of(fields: list[str]) -> str:
        buf = io.StringIO()
        # lineterminator "\r\n" makes QUOTE_MINIMAL quote fields holding \r or \n; cut off below
        w = csv.writer(buf, delimiter=delim, lineterminator="\r\n",
                       quoting=csv.QUOTE_ALL if fmt["quote_all"] else csv.QUOTE_MINIMAL)
        w.writerow(fields)
        return buf.getvalue()[:-2]

    hdr = [f"  {h} " if fmt["header_spaces"] else h for h in header]
    if fatal == "duplicate_header":
        hdr.append("label")
    elif fatal == "reserved_header":
        hdr.append(rng.choice(["offset", "status", "num_frames", "note", "sha256", "error"]))
    elif fatal == "no_path_column":
        hdr[hdr.index(next(h for h in hdr if h.strip() == "path"))] = "file"
    elif fatal == "empty_header_name":
        hdr.insert(1, "")
    elif fatal == "dot_header":
        hdr.append(".")
    extra_fields = len(hdr) - len(header)
    text_lines = [line_of(hdr) + (delim if fmt["trailing_delimiter"] else "")]
    line = 2
    for rec, exp in rows:
        if fmt["blank_lines"] and rng.random() < 0.5:
            text_lines.append("")
            line += 1
        fields = [rec.get(h, "") for h in header] + ["x"] * extra_fields
        if exp.defect == "only_delimiters":
            fields = [""] * len(fields)
        if exp.defect == "ragged_more":
            fields = fields + ["surplus", "fields"][: rng.randint(1, 2)]
        if exp.defect == "ragged_less":
            fields = fields[: rng.randint(1, len(fields) - 1)]
        text = line_of(fields)
        if exp.defect == "unclosed_quote":
            text = '"' + text
        elif exp.defect == "text_after_quote":
            cut = text.find(delim)
            text = '"' + text[:cut] + '"x' + text[cut:] if cut >= 0 else '"' + text + '"x'
        if fmt["trailing_delimiter"] and exp.defect != "ragged_less":  # else it could add the missing field
            text += delim
        exp.line = line
        if exp.id == "":
            exp.id = f"line{line}"
        text_lines.append(text)
        line += text.count("\n") + text.count("\r") - text.count("\r\n")
        line += 1
    body = nl.join(text_lines) + (nl if fmt["trailing_newline"] else "")
    if fatal == "header_only":
        body = text_lines[0] + nl
    elif fatal == "empty_file":
        body = rng.choice(["", nl, "   " + nl + nl])
    enc = fmt["encoding"]
    raw = (body.encode("utf-16-le") if enc == "utf-16-le-nobom" else body.encode(enc))
    if fatal == "binary_file":
        raw = rng.choice([b"\x89PNG\r\n\x1a\n", b"\x89HDF\r\n\x1a\n", b"PK\x03\x04", b"\xff\xd8\xff\xe0"]) + bytes(
            rng.randint(0, 255) for _ in range(200))
    elif fatal == "latin1_byte":
        raw = body.encode("utf-8").replace(b"\n", b"\n\xe9", 1) if "\n" in body else b"path\xe9,label\n"
        if enc != "utf-8":
            fmt["encoding"] = "utf-8"
    manifest.write_bytes(raw)
    return Case(seed, d, manifest, [e for _, e in rows], defects, fatal, fmt)


def run_cli(case: Case, model: str = "logmel") -> tuple[int, str, BaseException | None, Path]:
    """``featstore extract --manifest M --model logmel`` in-process; (exit code, output, escaped
    exception or None, store path)."""
    from typer.testing import CliRunner

    from featstore_cli.featstore_app import app

    out = case.dir / "store.h5"
    res = CliRunner().invoke(app, ["extract", "--manifest", str(case.manifest), "--model", model, "--out", str(out)])
    exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return res.exit_code, res.output, exc, out


def check_case(case: Case, code: int, output: str, exc: BaseException | None, out: Path) -> list[str]:
    """What broke the property (empty = clean)."""
    problems = []
    if exc is not None:
        problems.append(f"exception escaped: {type(exc).__name__}: {exc}")
    if "Traceback" in output:
        problems.append("a traceback was printed")
    if code != case.expect_exit:
        errs = [ln for ln in output.splitlines() if "error" in ln.lower()][:1]
        problems.append(f"exit code {code}, expected {case.expect_exit}" + (f" ({errs[0][:200]})" if errs else ""))
    if problems:
        return problems
    if case.fatal:
        errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines, expected 1")
        elif case.manifest.name not in errors[0]:
            problems.append(f"the error does not name {case.manifest.name}: {errors[0][:200]}")
        return problems
    import featstore

    try:
        with featstore.open(out) as store:
            items = store.items
    except Exception as e:  # noqa: BLE001
        return [f"store unreadable: {e}"]
    if len(items) != len(case.rows):
        return [f"{len(items)} items, the manifest has {len(case.rows)} rows"]
    for (_, it), exp in zip(items.iterrows(), case.rows):
        what = f"row at line {exp.line} ({exp.defect or 'valid'})"
        if it["id"] != exp.id:
            problems.append(f"{what}: id {it['id'][:60]!r}, expected {exp.id[:60]!r}")
            continue
        if exp.ok:
            if it["status"] != "ok" or int(it["num_frames"]) <= 0:
                problems.append(f"{what}: status {it['status']} ({it['error'][:200]}), expected ok with frames")
            elif it["label"] != exp.label:
                problems.append(f"{what}: label {it['label']!r}, expected {exp.label!r}")
        else:
            if it["status"] not in exp.statuses:
                problems.append(f"{what}: status {it['status']!r} ({it['error'][:160]}), expected one of {sorted(exp.statuses)}")
            elif not it["error"]:
                problems.append(f"{what}: status {it['status']} without a message")
            elif it["status"] == "bad_row" and f"line {exp.line}" not in it["error"]:
                problems.append(f"{what}: the message does not name line {exp.line}: {it['error'][:160]}")
            elif f"{it['id']}: {it['status']}" not in output.replace("\n", " ") and len(it["id"]) < 60:
                problems.append(f"{what}: not listed in the run's summary")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="number of cases")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first case (case k uses seed + k)")
    ap.add_argument("--keep", action="store_true", help="keep the failing cases' folders")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import tests.conftest  # noqa: F401 - imports this checkout's cli/ as featstore_cli

    from benchutil import load_text

    work = Path(tempfile.mkdtemp(prefix="fuzz_bench_"))
    good = make_good_clips(work / "good")
    print(f"fuzz_bench: {args.n} cases, seeds {args.seed}..{args.seed + args.n - 1}, {load_text()}", flush=True)
    t0 = time.perf_counter()
    clean, kinds, failed = 0, Counter(), []
    for k in range(args.n):
        seed = args.seed + k
        case = make_case(random.Random(seed), work, good, seed)
        kinds.update(case.defects + ([f"fatal:{case.fatal}"] if case.fatal else []))
        problems = check_case(case, *run_cli(case))
        if problems:
            failed.append(seed)
            print(f"seed {seed}: NOT CLEAN ({', '.join(case.defects)}{'; fatal ' + case.fatal if case.fatal else ''}; "
                  f"{case.fmt}): " + "; ".join(problems), flush=True)
            if not args.keep:
                shutil.rmtree(case.dir, ignore_errors=True)
        else:
            clean += 1
            shutil.rmtree(case.dir, ignore_errors=True)
        if (k + 1) % 100 == 0:
            print(f"  {k + 1} cases, {clean} clean, {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    print(f"defects drawn: {sum(kinds.values())} ({len(kinds)} kinds): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"wall {wall:.0f} s ({wall / max(args.n, 1):.2f} s per case), {load_text()}")
    if failed:
        print("failing seeds: " + " ".join(map(str, failed)))
    print(f"{clean}/{args.n} clean")
    if not args.keep or not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if clean == args.n else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())

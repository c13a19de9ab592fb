"""Manifests: CSV/TSV files, folder-per-label layouts, Praat TextGrid segments, and (through
:mod:`featstore.sources`) lhotse manifests and Hugging Face ``datasets`` saved to disk.

Every row becomes one item; problems found up front (duplicate ids, bad segment times, empty
paths) are reported with their line numbers and the rows are kept, marked with a status, so that
nothing silently vanishes from the store.

Which column holds what is a *column mapping* (``columns={"start": "onset", "end": "offset"}``,
``--columns start=onset,end=offset`` on the command line); unmapped roles use the column of the
role's own name. Columns that look like segment times but are not used raise a
:class:`ManifestWarning` (also kept in ``Manifest.warnings``).
"""
from __future__ import annotations

import csv
import hashlib
import codecs
import io
import json
import math
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from featstore.store import ITEM_COLUMNS

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au")
#: columns with a meaning of their own; every other column is kept as an extra ``items/`` column
KNOWN_COLUMNS = ("id", "path", "label", "start", "end")
#: ``items/`` columns the store fills itself: a manifest column of one of these names would
#: collide with them (``group`` is allowed as the group column: ``--group-column group``)
RESERVED_COLUMNS = tuple(c for c in ITEM_COLUMNS if c not in ("id", "path", "label"))
#: roles a column mapping can assign (``speaker`` = the CV group column, ``--group-column``)
ROLES = ("path", "id", "label", "speaker", "start", "end")
#: manifest formats ``read_manifest(format=...)`` / ``--manifest-format`` accepts
FORMATS = ("auto", "csv", "folder", "lhotse", "hf")
#: names that look like segment times (matched on the lower-cased name, ``-``/space/``.`` as ``_``)
_TIME_UNITS = r"(?:_?(?:s|sec|secs|seconds|time|t|ms|msec))?"
_TIME_PREFIX = r"(?:(?:seg|segment|t|time|word|phone|interval|target|utt|utterance)_?)?"
_LOOKS_START = re.compile(rf"^{_TIME_PREFIX}(?:start|begin|onset){_TIME_UNITS}$|^[tx]_?min$|^starttime$")
#: longest manifest field in characters (csv's default ``field_size_limit``); a longer one makes its
#: row a ``bad_row`` instead of ending the run
MAX_FIELD = 131072
#: segment times beyond this many seconds (116 days) are refused as not being times in a clip
MAX_SECONDS = 1e7
_LOOKS_END = re.compile(rf"^{_TIME_PREFIX}(?:end|stop|offset){_TIME_UNITS}$|^[tx]_?max$|^endtime$")


class ManifestWarning(UserWarning):
    """Something in a usable manifest that probably is not what the user meant (e.g. segment
    times in columns that are not used as the segment)."""


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (no such file, no ``path`` column, ...)."""


@dataclass
class Row:
    """One item to extract."""

    line: int  # line number in the manifest (1 = header), or 0 for folder layouts
    id: str
    path: str
    label: str = ""
    group: str = ""
    start: float | None = None
    end: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    status: str = ""  # "" = to be processed; otherwise a short error code
    error: str = ""
    where: str = ""  # how messages name the row ("line 5", "row 3", "supervision 'sup1'"); default "line N"

    @property
    def loc(self) -> str:
        return self.where or f"line {self.line}"


@dataclass
class Manifest:
    rows: list[Row]
    extra_columns: list[str]
    sha256: str
    source: str
    group_column: str | None
    #: role -> manifest column actually used (``{"start": "onset", ...}``)
    columns: dict[str, str] = field(default_factory=dict)
    #: warnings about the manifest (also issued as :class:`ManifestWarning`)
    warnings: list[str] = field(default_factory=list)
    format: str = "csv"

    @property
    def problems(self) -> list[Row]:
        return [r for r in self.rows if r.status]

    @property
    def has_segments(self) -> bool:
        return any(r.start is not None for r in self.rows)


def read_manifest(
    source: str | Path,
    group_column: str = "speaker",
    textgrid_tier: str | None = None,
    textgrid_labels: list[str] | None = None,
    *,
    columns: Mapping[str, str] | str | None = None,
    format: str = "auto",
    split: str | None = None,
    audio_cache: str | Path | None = None,
) -> Manifest:
    """Read a CSV/TSV manifest, a folder-per-label directory, a lhotse manifest or a Hugging Face
    dataset saved with ``save_to_disk``.

    CSV/TSV columns: ``path`` (required; relative to the manifest's folder), ``label``, ``id``
    (default: the file stem), ``start``/``end`` (segment in seconds), the group column (default
    ``speaker``), anything else kept as extra columns. ``columns`` maps roles (:data:`ROLES`) to
    other column names, e.g. ``{"start": "onset", "end": "offset", "speaker": "child_id"}`` or
    the string ``"start=onset,end=offset"``; the mapping is part of the manifest's hash. A
    directory ``ROOT/<label>/*.wav`` is read as a folder-per-label layout. ``format`` (default
    ``auto``, see :func:`detect_format`): ``csv``, ``folder``, ``lhotse`` (``*.jsonl[.gz]``
    recordings/supervisions/cuts) or ``hf`` (``datasets.save_to_disk`` folder; ``split`` picks one
    split of a DatasetDict; audio held as bytes is written once to ``audio_cache``, default
    ``cache/audio``). With ``textgrid_tier``, each row expands into one item per interval of that
    tier (in ``<audio stem>.TextGrid`` beside the audio, or the ``textgrid`` column) whose text is
    in ``textgrid_labels`` (all non-empty intervals when ``None``).
    """
    source = Path(source)
    mapping = parse_columns(columns) if isinstance(columns, str) else dict(columns or {})
    kind = detect_format(source) if format == "auto" else format
    if kind not in FORMATS[1:]:
        raise ManifestError(f"unknown manifest format {format!r}; use one of {', '.join(FORMATS)}")
    notes: list[str] = []
    if kind == "folder":
        if not source.is_dir():
            raise ManifestError(f"{source} is not a folder (folder-per-label layout: ROOT/<label>/*.wav)")
        if mapping:
            raise ManifestError(f"{source} is a folder-per-label layout: it has no columns to map ({_spec(mapping)})")
        rows, extra, digest = _read_folder(source)
        gcol, used = None, {}
    elif kind == "csv":
        if not source.exists():
            raise ManifestError(f"manifest not found: {source}")
        if not source.is_file():
            raise ManifestError(f"{source} is not a regular file: a manifest is a CSV/TSV text file")
        rows, extra, digest, gcol, used = _read_table(source, group_column, mapping)
    else:
        from featstore import sources

        table = (sources.read_lhotse(source, audio_cache=audio_cache) if kind == "lhotse" else
                 sources.read_hf_dataset(source, split=split, audio_cache=audio_cache, audio_column=mapping.get("path")))
        rows, extra, used, gcol = rows_from_records(table.records, table.header, table.name,
                                                    {**table.default_mapping, **mapping}, group_column, table.resolve_path)
        digest, notes = table.digest, list(table.warnings)
    digest = _digest_with_mapping(digest, used)
    notes += segment_lookalike_warnings(extra, used, source)
    check_column_names(extra, source, generated=("segment_label",) if textgrid_tier else ())
    if textgrid_tier:
        rows = _expand_textgrids(rows, textgrid_tier, textgrid_labels)
        extra = extra + ["segment_label"]
        digest = hashlib.sha256(f"{digest}|tier={textgrid_tier}|labels={textgrid_labels}".encode()).hexdigest()
    _mark_duplicates(rows)
    if not rows:
        raise ManifestError(f"{source} lists no clips")
    for msg in notes:
        warnings.warn(msg, ManifestWarning, stacklevel=2)
    return Manifest(rows, extra, digest, str(source), gcol, used, notes, kind)


def check_column_names(extra: list[str], source: str | Path, generated: tuple[str, ...] = ()) -> None:
    """Refuse extra manifest columns the store cannot keep under their own name: the store's own
    ``items/`` columns (:data:`RESERVED_COLUMNS`), columns added by an option (``generated``),
    empty names, names with ``/``, and names given twice. One error names them all."""
    problems = []
    clash = [c for c in extra if c in RESERVED_COLUMNS]
    if clash:
        names = ", ".join(repr(c) for c in clash)
        problems.append(
            f"column{'s' if len(clash) > 1 else ''} {names} {'are' if len(clash) > 1 else 'is'} reserved: the store "
            f"fills items/{clash[0]}{' etc.' if len(clash) > 1 else ''} itself; rename "
            f"{'them' if len(clash) > 1 else 'it'} in the manifest (e.g. {clash[0]!r} -> 'manifest_{clash[0]}')"
            + (" or name the speaker column with --group-column group" if "group" in clash else ""))
    added = [c for c in extra if c in generated]
    if added:
        problems.append(f"column {added[0]!r} is added by --textgrid-tier; rename the manifest's column")
    dup = sorted({c for c in extra if extra.count(c) > 1})
    if dup:
        problems.append(f"column{'s' if len(dup) > 1 else ''} {', '.join(repr(c) for c in dup)} appear twice in the header")
    odd = [c for c in extra if not c.strip() or "/" in c or c in (".", "..") or any(ord(ch) < 32 for ch in c)]
    if odd:
        problems.append(f"column name{'s' if len(odd) > 1 else ''} {', '.join(repr(_short(c)) for c in odd)} cannot be "
                        "stored (empty, '.', '..', or containing '/' or a control character)")
    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))


def detect_format(source: Path) -> str:
    """``hf`` for a folder written by ``datasets``' ``save_to_disk`` (``dataset_info.json`` +
    ``state.json``, or ``dataset_dict.json``), ``folder`` for any other folder, ``lhotse`` for
    ``*.jsonl`` / ``*.jsonl.gz`` files, ``csv`` otherwise."""
    if not source.exists():
        raise ManifestError(f"manifest not found: {source}")
    if source.is_dir():
        if ((source / "dataset_info.json").is_file() and (source / "state.json").is_file()) or (source / "dataset_dict.json").is_file():
            return "hf"
        return "folder"
    name = source.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "lhotse"
    return "csv"


def parse_columns(spec: str) -> dict[str, str]:
    """``"start=onset,end=offset"`` -> ``{"start": "onset", "end": "offset"}`` (roles checked)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        role, eq, col = part.partition("=")
        role, col = role.strip().lower(), col.strip()
        if not eq or not col:
            raise ManifestError(f"bad column mapping {part!r}: use ROLE=COLUMN, e.g. --columns start=onset,end=offset")
        if role in out:
            raise ManifestError(f"column mapping names '{role}' twice ({spec!r})")
        out[role] = col
    return out


def _spec(mapping: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def resolve_columns(header: list[str], mapping: Mapping[str, str], group_column: str, source: Any) -> dict[str, str]:
    """Role -> column of ``header`` for every role that has one; refuses mappings to missing
    columns, unknown roles and two speaker columns."""
    unknown = [r for r in mapping if r not in ROLES]
    if unknown:
        raise ManifestError(f"{source}: unknown column role{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                            f"in the column mapping; roles are {', '.join(ROLES)}")
    speaker = mapping.get("speaker")
    if speaker and group_column not in ("speaker", speaker):
        raise ManifestError(f"{source}: two speaker columns given ('{speaker}' in the column mapping, '{group_column}' "
                            "as --group-column); give one")
    missing = [f"{r}={c}" for r, c in mapping.items() if c not in header]
    if missing:
        raise ManifestError(f"{source}: column mapping {', '.join(missing)}: no such column "
                            f"(columns: {', '.join(header) or 'none'})")
    used: dict[str, str] = {}
    for role in ROLES:
        if role in mapping:
            used[role] = mapping[role]
        elif role == "speaker":
            if group_column in header:
                used[role] = group_column
            elif group_column != "speaker":
                raise ManifestError(f"{source}: --group-column '{group_column}' is not a column ({', '.join(header)})")
        elif role in header:
            used[role] = role
    if "start" in used and used.get("start") == used.get("end"):
        raise ManifestError(f"{source}: start and end both map to column '{used['start']}'")
    # a column named after a role it does not fill cannot be kept under its own name
    shadowed = [c for c in header if c in ("id", "path", "label") and used.get(c) not in (None, c)
                and c not in used.values()]
    if shadowed:
        c = shadowed[0]
        raise ManifestError(f"{source}: column '{c}' is not used (the {c} comes from column '{used[c]}') but the "
                            f"store keeps items/{c} for it; rename or drop column '{c}' (e.g. 'manifest_{c}')")
    return used


def rows_from_records(
    records: Iterable[tuple[str, int, Mapping[str, Any]]],
    header: list[str],
    source: Any,
    mapping: Mapping[str, str],
    group_column: str,
    resolve_path: Callable[[str], str],
) -> tuple[list[Row], list[str], dict[str, str], str | None]:
    """Rows from ``(where, line, record)`` triples under a column mapping: the one place where
    manifest columns become ids, paths, labels, speakers and segments, for every format.

    A record may carry ``_status``/``_error`` (a problem its reader found: the row is kept with
    that status) and ``_id`` (the id when no id column is given; default: the file stem).

    Returns ``(rows, extra_columns, used_mapping, group_column)``.
    """
    used = resolve_columns(header, mapping, group_column, source)
    gcol = used.get("speaker")
    extra = [h for h in header if h not in used.values() and h != "textgrid"]
    pc, ic, lc, sc, ec = (used.get(r) for r in ("path", "id", "label", "start", "end"))
    if pc is None:
        raise ManifestError(f"{source}: no 'path' column (columns: {', '.join(header) or 'none'}); "
                            "name the audio column with --columns path=COLUMN")
    rows = []
    for where, n, rec in records:
        rec = {k: _cell(v) for k, v in rec.items() if k is not None}
        bad_col, cell_problem = _cell_problem(rec)  # before sanitising: the message names what was there
        if cell_problem:
            rec = {k: _sanitize(v) for k, v in rec.items()}
        p = rec.get(pc, "")
        if bad_col is not None and (bad_col == ic or (bad_col == pc and not (ic and rec.get(ic)))):
            # the id would be the broken value (or the stem of a broken path): name the row by its line
            rid = f"line{n}"
        else:
            rid = (rec.get(ic, "") if ic else "") or rec.get("_id", "") or (Path(p).stem if p else f"line{n}")
        row = Row(
            line=n, id=rid, path=resolve_path(p) if p else p,
            label=rec.get(lc, "") if lc else "", group=rec.get(gcol, "") if gcol else "",
            extra={k: rec.get(k, "") for k in extra}, where=where if not where.startswith("line ") else "",
        )
        loc = row.loc
        if rec.get("textgrid"):
            row.extra["textgrid"] = resolve_path(rec["textgrid"])
        if not p:
            row.status, row.error = "bad_row", f"{loc}: empty {'path' if pc == 'path' else repr(pc)}"
        s_raw, e_raw = (rec.get(sc, "") if sc else ""), (rec.get(ec, "") if ec else "")
        try:
            row.start = float(s_raw) if s_raw else None
            row.end = float(e_raw) if e_raw else None
        except ValueError:
            row.start = row.end = None
            row.status, row.error = "bad_row", f"{loc}: start/end are not numbers ({_short(s_raw)!r}, {_short(e_raw)!r})"
        else:
            problem = segment_problem(row.start, row.end)
            if problem:
                row.start = row.end = None  # never handed on: a bad row is not extracted
                row.status, row.error = "bad_row", f"{loc}: {problem}"
        if cell_problem:
            row.status, row.error = "bad_row", f"{loc}: {cell_problem}"
        if rec.get("_status"):
            row.status, row.error = rec["_status"], rec.get("_error", "")
        rows.append(row)
    return rows, extra, used, gcol


def segment_problem(start: float | None, end: float | None) -> str | None:
    """Why ``[start, end)`` seconds is not a segment (``None`` when it is one, or when both are
    ``None``): one of the two missing, not finite (``nan``, ``inf``, ``1e999``), negative, beyond
    :data:`MAX_SECONDS`, or reversed/empty."""
    if start is None and end is None:
        return None
    if (start is None) != (end is None):
        return "give both start and end, or neither"
    if not (math.isfinite(start) and math.isfinite(end)):
        return f"start/end must be finite numbers of seconds ({start!r}, {end!r})"
    if start > MAX_SECONDS or end > MAX_SECONDS:
        return f"segment [{start}, {end}) lies beyond {MAX_SECONDS:.0e} s: not a time in a clip"
    if not (start >= 0 and end > start):
        return f"segment [{start}, {end}) is empty or negative"
    return None


def _cell_problem(rec: Mapping[str, str]) -> tuple[str | None, str | None]:
    """A value the store cannot keep: a NUL character or a field longer than :data:`MAX_FIELD`
    characters (almost always an unclosed quote that swallowed the rows after it)."""
    for k, v in rec.items():
        if k.startswith("_"):
            continue
        if "\x00" in v:
            return k, f"column {_short(k)!r} contains a NUL character"
        if len(v) > MAX_FIELD:
            return k, (f"column {_short(k)!r} holds {len(v):,} characters (at most {MAX_FIELD:,}; an unclosed quote, "
                       "or a file that is not a manifest?)")
    return None, None


def _sanitize(value: str) -> str:
    """What a bad row keeps of a value (the store must be able to hold it)."""
    value = value.replace("\x00", "\ufffd")
    return value if len(value) <= 200 else value[:200] + "..."


def _short(value: str, n: int = 40) -> str:
    return value if len(value) <= n else value[:n] + "..."


def _cell(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _digest_with_mapping(digest: str, used: Mapping[str, str]) -> str:
    """The manifest hash, changed by any mapping that differs from the default (a role read from a
    column of another name), so that a store's identity says which columns were used."""
    moved = {role: col for role, col in used.items() if col != role}
    if not moved:
        return digest
    return hashlib.sha256(f"{digest}|columns={json.dumps(moved, sort_keys=True)}".encode()).hexdigest()


def segment_lookalike_warnings(extra: list[str], used: Mapping[str, str], source: Any) -> list[str]:
    """One warning naming the extra (unused) columns whose names look like segment times, with the
    mapping that would use them when the manifest has no segment yet. Such a column named like one
    of the store's own ``items/`` columns (``offset``) cannot be kept at all: a :class:`ManifestError`
    that says how to map it."""
    from featstore.store import ITEM_COLUMNS

    norm = {c: re.sub(r"[\s.\-]+", "_", c.strip().lower()) for c in extra}
    names = [c for c in extra if _LOOKS_START.match(norm[c]) or _LOOKS_END.match(norm[c])]
    if not names:
        return []
    starts = [c for c in names if _LOOKS_START.match(norm[c])]
    ends = [c for c in names if _LOOKS_END.match(norm[c])]
    hint = ""
    if starts and ends:
        key = lambda c, words: re.sub(words, "#", norm[c], count=1)  # noqa: E731 - onset/offset -> '#'
        pairs = [(a, b) for a in starts for b in ends
                 if key(a, r"start|begin|onset|min") == key(b, r"end|stop|offset|max")]
        a, b = pairs[0] if pairs else (starts[0], ends[0])
        hint = f"--columns start={a},end={b} (Python: columns={{'start': {a!r}, 'end': {b!r}}})"
        if any(norm[c].endswith(("ms", "msec")) for c in (a, b)):
            hint += "; start/end are read as seconds, so convert milliseconds first"
    clash = [c for c in names if c in ITEM_COLUMNS]
    others = [c for c in extra if c in RESERVED_COLUMNS and c not in names]
    if clash and not others:  # with other reserved names, check_column_names reports them all
        c = clash[0]
        raise ManifestError(f"{source}: column '{c}' looks like a segment time, but the store keeps items/{c} for "
                            f"itself, so it cannot be an extra column: use it as the segment "
                            f"({hint or f'--columns start=COLUMN,end=COLUMN'}) or rename it")
    many = len(names) > 1
    msg = (f"{source}: column{'s' if many else ''} {', '.join(repr(c) for c in names)} look{'' if many else 's'} like "
           f"segment times but {'are' if many else 'is'} not used as the segment (kept as "
           f"{'extra columns' if many else 'an extra column'})")
    if "start" in used:
        return [msg + f"; the segment comes from columns '{used['start']}'/'{used['end']}'"]
    msg += "; items get no segment, so pooling runs over the whole clip"
    if hint:
        msg += f". To use them as the segment (seconds): {hint}"
    return [msg]


def _read_table(path: Path, group_column: str, mapping: Mapping[str, str] | None = None
                ) -> tuple[list[Row], list[str], str, str | None, dict[str, str]]:
    raw = _read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    text = decode_text(raw, path)
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if path.suffix.lower() not in (".tsv", ".tab", ".csv"):
        first = next((ln for ln in text.splitlines() if ln.strip()), "")[:10000]
        try:
            delim = csv.Sniffer().sniff(first, delimiters=",\t;").delimiter
        except csv.Error:
            pass
    records = split_records(text, delim, header=True)
    if not records:
        raise ManifestError(f"{path} is empty: a manifest needs a header line with a 'path' column")
    head_line, header, problem = records[0]
    if problem:
        raise ManifestError(f"{path}: line {head_line}, the header, {problem}")
    header = [h.strip() for h in header]
    body = records[1:]
    while header and not header[-1]:  # a trailing delimiter (spreadsheets write them): no column
        header.pop()
    dup = sorted({h for h in header if header.count(h) > 1 and h})
    if dup:
        where = "; ".join(f"{h!r} in columns {', '.join(str(i + 1) for i, c in enumerate(header) if c == h)}" for h in dup)
        raise ManifestError(f"{path}: the header names {'a column' if len(dup) == 1 else 'columns'} twice ({where}); "
                            "give every column its own name")
    base = path.parent

    def rows() -> Iterator[tuple[str, int, dict[str, Any]]]:
        for n, fields, problem in body:
            if fields is not None and len(fields) > len(header) and not any(f.strip() for f in fields[len(header):]):
                fields = fields[:len(header)]  # trailing empty fields
            if problem is None and len(fields) != len(header):
                problem = (f"{len(fields)} field{'s' if len(fields) != 1 else ''}, the header has {len(header)} "
                           f"({', '.join(_short(h, 20) for h in header)})")
            if problem:  # which field is which is unknown: the row keeps no value and is named by its line
                yield f"line {n}", n, {"_status": "bad_row", "_error": f"line {n}: {problem}", "_id": f"line{n}"}
            else:
                yield f"line {n}", n, dict(zip(header, fields))

    rows_, extra, used, gcol = rows_from_records(
        rows(), header, path, mapping or {}, group_column,
        resolve_path=lambda p: str((base / p) if not Path(p).is_absolute() else p))
    return rows_, extra, digest, gcol, used


def _read_bytes(path: Path) -> bytes:
    """The manifest's bytes; a FIFO, device or unreadable file is a :class:`ManifestError`."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path} is not a regular file: a manifest is a CSV/TSV text file")
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None


#: file signatures of things that are not manifests (for the message)
_MAGIC = {b"\x89PNG": "a PNG image", b"RIFF": "a RIFF/WAV file", b"fLaC": "a FLAC file", b"\x89HDF": "an HDF5 file",
          b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file", b"%PDF": "a PDF", b"OggS": "an Ogg file",
          b"ID3": "an MP3 file", b"\x7fELF": "a program"}


def decode_text(raw: bytes, path: Any, what: str = "manifest") -> str:
    """The text of a manifest (or TextGrid): UTF-8 (with or without a BOM), or UTF-16/UTF-32 with a
    BOM, or UTF-16 without one (recognised by its NUL bytes). Anything else is a
    :class:`ManifestError` that names the file, the line and the byte, and says what is expected."""
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        enc = "utf-8"
        kind = next((what for magic, what in _MAGIC.items() if raw.startswith(magic)), None)
        head = raw[:4096]
        nul = head.count(0)
        if kind is None and nul:
            half = max(1, len(head) // 2)
            even, odd = head[0::2].count(0) / half, head[1::2].count(0) / half
            if odd > 0.3 and even < odd / 4:
                enc = "utf-16-le"
            elif even > 0.3 and odd < even / 4:
                enc = "utf-16-be"
            elif nul > max(2, len(head) // 50):  # a stray NUL in text is a bad row, many are binary data
                kind = "binary data"
        if kind:
            raise ManifestError(f"{path} is not a text {what} (it looks like {kind}, starting with {raw[:8]!r})"
                                + ("; give a CSV/TSV text file" if what == "manifest" else ""))
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as exc:
        body = raw[len(codecs.BOM_UTF8):] if enc == "utf-8-sig" else raw
        line = body[:exc.start].count(b"\n") + 1 if enc.startswith("utf-8") else None
        at = f"line {line}: " if line else ""
        raise ManifestError(f"{path}: {at}not valid {enc.upper().replace('-SIG', '')} text (byte 0x{body[exc.start]:02x} "
                            f"at offset {exc.start}); save the file as UTF-8 (UTF-16 with a byte-order mark "
                            "is read too)") from None


class _Lines:
    """Physical lines handed to ``csv.reader`` one at a time; :attr:`pos` = lines consumed."""

    def __init__(self, lines: list[str]):
        self.lines, self.pos = lines, 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _swallows_rows(fields: list[str], delimiter: str, width: int) -> bool:
    """A field that runs over lines one of which looks like a whole row (``width - 1`` delimiters,
    and at least 2): a quote left open that a quote in a later row closed."""
    for f in fields:
        lines = re.split(r"\r\n|\r|\n", f)
        if len(lines) > 1 and any(line.count(delimiter) >= max(2, width - 1) for line in lines):
            return True
    return False


def split_records(text: str, delimiter: str, header: bool = False) -> list[tuple[int, list[str] | None, str | None]]:
    r"""CSV records of ``text`` as ``(line, fields, problem)``: ``line`` is the physical line the
    record starts on (``\n``, ``\r\n`` and ``\r`` end lines; quoted fields may span lines), blank
    lines are skipped. A record that breaks the quoting rules (an unclosed quote, text after a
    closing quote) gets ``fields=None`` and the reason, and reading goes on at the next line, so
    one broken row never swallows the rows after it; with ``header``, so does a record that spans
    several lines and has another number of fields than the first record (a quote closed by one
    in a later row). Field length is not limited here (see :data:`MAX_FIELD`)."""
    lines = list(io.StringIO(text, newline=""))
    src = _Lines(lines)
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, len(text) + 1))
    out: list[tuple[int, list[str] | None, str | None]] = []
    width: int | None = None
    quote_hint = ' (a quote inside a field is written "")'
    try:
        reader = csv.reader(src, delimiter=delimiter, strict=True, skipinitialspace=True)
        while True:
            first = src.pos
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if "end of data" in str(exc):
                    why = "has an unclosed quote"
                elif src.pos - first > 1:
                    why = f"has an unclosed quote (it runs on to line {src.pos})"
                else:
                    why = f"breaks the CSV quoting rules ({exc})"
                out.append((first + 1, None, why + quote_hint))
                src.pos = first + 1
                reader = csv.reader(src, delimiter=delimiter, strict=True, skipinitialspace=True)
                continue
            raw_text = "".join(lines[first:src.pos])
            if not raw_text.strip() and delimiter not in raw_text:  # a blank line ("" or a row of delimiters is a row)
                continue
            n = len(fields)
            while n and not fields[n - 1].strip():
                n -= 1
            if header and width is None:
                width = n
            elif width is not None and src.pos - first > 1 and (not n <= width <= len(fields)
                                                                or _swallows_rows(fields, delimiter, width)):
                out.append((first + 1, None, f"has an unclosed quote (it runs on to line {src.pos}){quote_hint}"))
                src.pos = first + 1
                reader = csv.reader(src, delimiter=delimiter, strict=True, skipinitialspace=True)
                continue
            out.append((first + 1, fields, None))
    finally:
        csv.field_size_limit(old)
    return out


def _read_folder(root: Path) -> tuple[list[Row], list[str], str]:
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.rglob("*")):
            if f.suffix.lower() in AUDIO_SUFFIXES:
                rel = f.relative_to(root)
                rows.append(Row(line=0, id=str(rel.with_suffix("")).replace("/", "_"), path=str(f), label=label_dir.name))
    digest = hashlib.sha256("\n".join(f"{r.path}|{r.label}" for r in rows).encode()).hexdigest()
    return rows, [], digest


def read_textgrid(path: str | Path) -> Any:
    """A Praat TextGrid (``textgrids.TextGrid``) from ``path``: text (long or short format) in UTF-8
    with or without a BOM, UTF-16 with a BOM or without one, any line endings, or Praat's binary
    format. Raises ``FileNotFoundError`` when there is no file and ``ValueError`` with a one-line
    reason for anything else (a directory, a FIFO, not a TextGrid, a parse error)."""
    import textgrids

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path.name} is a directory, not a TextGrid")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path.name} is not a regular file (a FIFO, device or socket)")
    raw = path.read_bytes()
    grid = textgrids.TextGrid()
    grid.filename = str(path)
    if not raw.startswith(b"ooBinaryFile"):
        try:
            text = decode_text(raw, path.name, what="TextGrid")
        except ManifestError as exc:
            raise ValueError(str(exc)) from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        head = [ln.strip() for ln in text.split("\n", 2)[:2]]
        if head != ['File type = "ooTextFile"', 'Object class = "TextGrid"']:
            raise ValueError(f'{path.name} is not a Praat TextGrid (it does not start with File type = "ooTextFile", '
                             'Object class = "TextGrid")')
        raw = text.encode("utf-8")
    try:
        grid.parse(raw)
    except Exception as exc:  # noqa: BLE001 - the parser raises IndexError, ValueError, TypeError, ...
        raise ValueError(f"{path.name} cannot be parsed as a TextGrid ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})") from None
    return grid


def _expand_textgrids(rows: list[Row], tier: str, labels: list[str] | None) -> list[Row]:
    wanted = set(labels) if labels else None
    out: list[Row] = []
    for row in rows:
        if row.status:
            out.append(row)
            continue
        tg = Path(row.extra.pop("textgrid", "") or Path(row.path).with_suffix(".TextGrid"))
        try:
            grid = read_textgrid(tg)
            intervals = grid[tier]
        except FileNotFoundError:
            row.status, row.error = "no_textgrid", f"{row.loc}: no TextGrid at {tg}"
            out.append(row)
            continue
        except KeyError:
            row.status, row.error = "no_textgrid", f"{row.loc}: {tg.name} has no tier '{tier}'"
            out.append(row)
            continue
        except ValueError as exc:
            row.status, row.error = "no_textgrid", f"{row.loc}: {exc}"
            out.append(row)
            continue
        if getattr(intervals, "is_point_tier", False):
            row.status, row.error = "no_textgrid", f"{row.loc}: tier '{tier}' of {tg.name} is a point tier (segments need an interval tier)"
            out.append(row)
            continue
        k = 0
        for n_iv, iv in enumerate(intervals, start=1):
            text = _cell(iv.text)
            if not text or (wanted is not None and text not in wanted):
                continue
            item = Row(line=row.line, id=f"{row.id}_{k:03d}", path=row.path, label=row.label, group=row.group,
                       extra={**row.extra, "segment_label": _sanitize(text)}, where=row.where)
            problem = segment_problem(float(iv.xmin), float(iv.xmax))
            if problem is None and (len(text) > MAX_FIELD or "\x00" in text):
                problem = "its text cannot be stored (a NUL character, or too long)"
            if problem:
                item.status = "bad_segment"
                item.error = f"{row.loc}: interval {n_iv} of tier '{tier}' in {tg.name}: {problem}"
            else:
                item.start, item.end = float(iv.xmin), float(iv.xmax)
            out.append(item)
            k += 1
        if k == 0:
            row.status, row.error = "no_segment", f"{row.loc}: tier '{tier}' of {tg.name} has no matching interval"
            out.append(row)
    return out


def _mark_duplicates(rows: list[Row]) -> None:
    first: dict[str, str] = {}
    for row in rows:
        if row.id in first:
            if not row.status:
                row.status = "duplicate_id"
                row.error = f"{row.loc}: id '{row.id}' already used on {first[row.id]}"
        else:
            first[row.id] = row.loc


def rows_as_dicts(manifest: Manifest) -> list[dict[str, Any]]:
    """Initial ``items/`` values for each row (before extraction)."""
    out = []
    for r in manifest.rows:
        d: dict[str, Any] = {"id": r.id, "path": r.path, "label": r.label, "group": r.group}
        d.update({k: v for k, v in r.extra.items()})
        out.append(d)
    return out

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
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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
        if not source.is_file():
            raise ManifestError(f"manifest not found: {source}")
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
    odd = [c for c in extra if not c.strip() or "/" in c]
    if odd:
        problems.append(f"column name{'s' if len(odd) > 1 else ''} {', '.join(repr(c) for c in odd)} cannot be stored "
                        "(empty, or containing '/')")
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
        p = rec.get(pc, "")
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
            row.status, row.error = "bad_row", f"{loc}: start/end are not numbers ({s_raw!r}, {e_raw!r})"
        else:
            if (row.start is None) != (row.end is None):
                row.status, row.error = "bad_row", f"{loc}: give both start and end, or neither"
            elif row.start is not None and not (row.start >= 0 and row.end > row.start):  # also catches NaN
                row.status, row.error = "bad_row", f"{loc}: segment [{row.start}, {row.end}) is empty or negative"
        if rec.get("_status"):
            row.status, row.error = rec["_status"], rec.get("_error", "")
        rows.append(row)
    return rows, extra, used, gcol


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
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = raw.decode("utf-8-sig")
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if path.suffix.lower() not in (".tsv", ".tab", ".csv"):
        try:
            delim = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",\t;").delimiter
        except (csv.Error, IndexError):
            pass
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    base = path.parent
    records = ((f"line {n}", n, rec) for n, rec in enumerate(reader, start=2))
    rows, extra, used, gcol = rows_from_records(
        records, header, path, mapping or {}, group_column,
        resolve_path=lambda p: str((base / p) if not Path(p).is_absolute() else p))
    return rows, extra, digest, gcol, used


def _read_folder(root: Path) -> tuple[list[Row], list[str], str]:
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.rglob("*")):
            if f.suffix.lower() in AUDIO_SUFFIXES:
                rel = f.relative_to(root)
                rows.append(Row(line=0, id=str(rel.with_suffix("")).replace("/", "_"), path=str(f), label=label_dir.name))
    digest = hashlib.sha256("\n".join(f"{r.path}|{r.label}" for r in rows).encode()).hexdigest()
    return rows, [], digest


def _expand_textgrids(rows: list[Row], tier: str, labels: list[str] | None) -> list[Row]:
    import textgrids

    wanted = set(labels) if labels else None
    out: list[Row] = []
    for row in rows:
        if row.status:
            out.append(row)
            continue
        tg = Path(row.extra.pop("textgrid", "") or Path(row.path).with_suffix(".TextGrid"))
        try:
            grid = textgrids.TextGrid(str(tg))
            intervals = grid[tier]
        except FileNotFoundError:
            row.status, row.error = "no_textgrid", f"{row.loc}: no TextGrid at {tg}"
            out.append(row)
            continue
        except KeyError:
            row.status, row.error = "no_textgrid", f"{row.loc}: {tg.name} has no tier '{tier}'"
            out.append(row)
            continue
        except Exception as exc:  # noqa: BLE001 - parser errors of several kinds
            row.status, row.error = "no_textgrid", f"{row.loc}: cannot parse {tg.name}: {exc}"
            out.append(row)
            continue
        k = 0
        for iv in intervals:
            text = iv.text.strip()
            if not text or (wanted is not None and text not in wanted):
                continue
            out.append(Row(
                line=row.line, id=f"{row.id}_{k:03d}", path=row.path, label=row.label, group=row.group,
                start=float(iv.xmin), end=float(iv.xmax), extra={**row.extra, "segment_label": text}, where=row.where,
            ))
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

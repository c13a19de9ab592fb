"""Manifests: CSV/TSV files, folder-per-label layouts, and Praat TextGrid segments.

Every row becomes one item; problems found up front (duplicate ids, bad segment times, empty
paths) are reported with their line numbers and the rows are kept, marked with a status, so that
nothing silently vanishes from the store.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featstore.store import ITEM_COLUMNS

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au")
#: columns with a meaning of their own; every other column is kept as an extra ``items/`` column
KNOWN_COLUMNS = ("id", "path", "label", "start", "end")
#: ``items/`` columns the store fills itself: a manifest column of one of these names would
#: collide with them (``group`` is allowed as the group column: ``--group-column group``)
RESERVED_COLUMNS = tuple(c for c in ITEM_COLUMNS if c not in ("id", "path", "label"))


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


@dataclass
class Manifest:
    rows: list[Row]
    extra_columns: list[str]
    sha256: str
    source: str
    group_column: str | None

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
) -> Manifest:
    """Read a CSV/TSV manifest or a folder-per-label directory.

    CSV/TSV columns: ``path`` (required; relative to the manifest's folder), ``label``, ``id``
    (default: the file stem), ``start``/``end`` (segment in seconds), the group column (default
    ``speaker``), anything else kept as extra columns. A directory ``ROOT/<label>/*.wav`` is read as
    a folder-per-label layout. With ``textgrid_tier``, each row expands into one item per interval
    of that tier (in ``<audio stem>.TextGrid`` beside the audio, or the ``textgrid`` column) whose
    text is in ``textgrid_labels`` (all non-empty intervals when ``None``).
    """
    source = Path(source)
    if source.is_dir():
        rows, extra, digest = _read_folder(source)
        gcol = None
    elif source.is_file():
        rows, extra, digest, gcol = _read_table(source, group_column)
    else:
        raise ManifestError(f"manifest not found: {source}")
    check_column_names(extra, source, generated=("segment_label",) if textgrid_tier else ())
    if textgrid_tier:
        rows = _expand_textgrids(rows, textgrid_tier, textgrid_labels)
        extra = extra + ["segment_label"]
        digest = hashlib.sha256(f"{digest}|tier={textgrid_tier}|labels={textgrid_labels}".encode()).hexdigest()
    _mark_duplicates(rows)
    if not rows:
        raise ManifestError(f"{source} lists no clips")
    return Manifest(rows, extra, digest, str(source), gcol)


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


def _read_table(path: Path, group_column: str) -> tuple[list[Row], list[str], str, str | None]:
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
    if "path" not in header:
        raise ManifestError(f"{path}: no 'path' column (columns: {', '.join(header) or 'none'})")
    gcol = group_column if group_column in header else None
    if group_column != "speaker" and gcol is None:
        raise ManifestError(f"{path}: --group-column '{group_column}' is not a column ({', '.join(header)})")
    extra = [h for h in header if h not in KNOWN_COLUMNS and h != gcol and h != "textgrid"]
    base = path.parent
    rows = []
    for n, rec in enumerate(reader, start=2):
        rec = {k: (v or "").strip() for k, v in rec.items() if k is not None}
        p = rec.get("path", "")
        row = Row(
            line=n, id=rec.get("id") or (Path(p).stem if p else f"line{n}"),
            path=str((base / p) if p and not Path(p).is_absolute() else p),
            label=rec.get("label", ""), group=rec.get(gcol, "") if gcol else "",
            extra={k: rec.get(k, "") for k in extra},
        )
        if rec.get("textgrid"):
            row.extra["textgrid"] = str(base / rec["textgrid"])
        if not p:
            row.status, row.error = "bad_row", f"line {n}: empty path"
        try:
            row.start = float(rec["start"]) if rec.get("start") else None
            row.end = float(rec["end"]) if rec.get("end") else None
        except ValueError:
            row.status, row.error = "bad_row", f"line {n}: start/end are not numbers ({rec.get('start')!r}, {rec.get('end')!r})"
        else:
            if (row.start is None) != (row.end is None):
                row.status, row.error = "bad_row", f"line {n}: give both start and end, or neither"
            elif row.start is not None and (row.start < 0 or row.end <= row.start):
                row.status, row.error = "bad_row", f"line {n}: segment [{row.start}, {row.end}) is empty or negative"
        rows.append(row)
    return rows, extra, digest, gcol


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
            row.status, row.error = "no_textgrid", f"line {row.line}: no TextGrid at {tg}"
            out.append(row)
            continue
        except KeyError:
            row.status, row.error = "no_textgrid", f"line {row.line}: {tg.name} has no tier '{tier}'"
            out.append(row)
            continue
        except Exception as exc:  # noqa: BLE001 - parser errors of several kinds
            row.status, row.error = "no_textgrid", f"line {row.line}: cannot parse {tg.name}: {exc}"
            out.append(row)
            continue
        k = 0
        for iv in intervals:
            text = iv.text.strip()
            if not text or (wanted is not None and text not in wanted):
                continue
            out.append(Row(
                line=row.line, id=f"{row.id}_{k:03d}", path=row.path, label=row.label, group=row.group,
                start=float(iv.xmin), end=float(iv.xmax), extra={**row.extra, "segment_label": text},
            ))
            k += 1
        if k == 0:
            row.status, row.error = "no_segment", f"line {row.line}: tier '{tier}' of {tg.name} has no matching interval"
            out.append(row)
    return out


def _mark_duplicates(rows: list[Row]) -> None:
    first: dict[str, int] = {}
    for row in rows:
        if row.id in first:
            if not row.status:
                row.status = "duplicate_id"
                row.error = f"line {row.line}: id '{row.id}' already used on line {first[row.id]}"
        else:
            first[row.id] = row.line


def rows_as_dicts(manifest: Manifest) -> list[dict[str, Any]]:
    """Initial ``items/`` values for each row (before extraction)."""
    out = []
    for r in manifest.rows:
        d: dict[str, Any] = {"id": r.id, "path": r.path, "label": r.label, "group": r.group}
        d.update({k: v for k, v in r.extra.items()})
        out.append(d)
    return out

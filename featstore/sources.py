"""Manifests from the speech ecosystem: lhotse manifests and Hugging Face ``datasets`` on disk.

Both readers go through the libraries themselves (optional extras: ``pip install -e ".[lhotse]"``,
``".[datasets]"``) and return a :class:`Table` of plain records; :func:`featstore.manifest.read_manifest`
turns it into the same :class:`~featstore.manifest.Manifest` a CSV gives, with the same column
mapping, validation and per-row statuses (``featstore.manifest.rows_from_records``).

* **lhotse**: a ``RecordingSet`` (+ the ``SupervisionSet`` beside it, found by the file name with
  ``recordings`` -> ``supervisions``), a ``SupervisionSet`` (+ its recordings), or a ``CutSet``, as
  ``*.jsonl`` / ``*.jsonl.gz``. One item per supervision: its recording is the audio (the model
  sees the whole recording, the store records the supervision's frames as the segment), its
  ``speaker`` the group, ``text``/``language``/``gender``/``recording_id`` and every ``custom``
  field extra columns (``label`` from a custom field ``label``, or ``--columns label=FIELD``).
  A recording without supervision is kept as a ``no_segment`` row; a supervision whose recording is
  not in the recordings is kept as a ``missing`` row. A cut gives one item per supervision that
  lies wholly inside it (times relative to the cut's audio); a cut without one gives one item.
* **Hugging Face datasets** (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folders): the
  ``Audio`` column is the audio, ``ClassLabel`` columns are decoded to their names, every other
  scalar column is a column of the manifest (``label``, ``speaker``, ...; map others with
  ``--columns``). A DatasetDict gives all splits (with a ``split`` column) or the one named by
  ``split``.

Audio that is not a plain file on disk (a Hugging Face Audio value holding bytes — which is what
``save_to_disk`` stores, even for datasets built from files —, a lhotse in-memory source, a
multi-file or transformed recording, a cut of part of a recording) is written **once** to an
audio cache folder (default ``cache/audio``): encoded bytes as they are, anything lhotse decodes as
float32 WAV, named by a hash of its content or description, so a second read (a resumed run)
writes nothing. Every path then goes through the same loader as CSV audio (libsndfile + soxr);
``datasets``' own decoding (torchcodec) is never needed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from featstore.manifest import AUDIO_SUFFIXES, ManifestError

DEFAULT_AUDIO_CACHE = Path("cache") / "audio"


@dataclass
class Table:
    """Records of a manifest before the column mapping is applied.

    ``records``: ``(where, line, record)`` with ``where`` naming the row in messages; a record may
    carry ``_status``/``_error`` (a problem found while reading) and ``_id`` (the id to use when
    no id column is mapped).
    """

    name: str
    header: list[str]
    records: list[tuple[str, int, dict[str, Any]]]
    digest: str
    resolve_path: Callable[[str], str] = str
    warnings: list[str] = field(default_factory=list)
    default_mapping: dict[str, str] = field(default_factory=dict)


def _require(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ManifestError(f"reading {what} needs the optional package '{module}' ({exc}): "
                            f"pip install 'featstore[{extra}]' (or pip install {module})") from None


def _safe(name: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:n] or "audio"


class AudioCache:
    """Writes audio that is not a plain file into a folder, once (content-addressed names)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else DEFAULT_AUDIO_CACHE

    def _target(self, key: str, stem: str, suffix: str) -> Path:
        return self.root / f"{key[:16]}-{_safe(stem)}{suffix}"

    def _write(self, target: Path, write: Callable[[Path], None]) -> Path:
        if target.is_file() and target.stat().st_size > 0:
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            write(tmp)
            os.replace(tmp, target)  # never a half-written file under the final name
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    def put_bytes(self, data: bytes, stem: str, suffix: str = "") -> Path:
        """Encoded audio (a WAV/FLAC/MP3... file's bytes) -> a file holding exactly those bytes."""
        suffix = suffix.lower() if suffix.lower() in AUDIO_SUFFIXES else _sniff_suffix(data)
        target = self._target(hashlib.sha256(data).hexdigest(), stem, suffix)
        return self._write(target, lambda p: p.write_bytes(data))

    def put_decoded(self, description: str, stem: str, load: Callable[[], tuple[Any, int]]) -> Path:
        """Audio only lhotse can produce (``load() -> (samples[channels, n], rate)``) -> float32 WAV,
        named by a hash of its description (decoded only when not cached yet)."""
        import numpy as np
        import soundfile as sf

        target = self._target(hashlib.sha256(description.encode()).hexdigest(), stem, ".wav")

        def write(p: Path) -> None:
            samples, rate = load()
            x = np.asarray(samples, dtype=np.float32)
            sf.write(str(p), x.T if x.ndim == 2 else x, int(rate), subtype="FLOAT", format="WAV")

        return self._write(target, write)


def _sniff_suffix(data: bytes) -> str:
    head = bytes(data[:12])
    if head[:4] == b"RIFF":
        return ".wav"
    if head[:4] == b"fLaC":
        return ".flac"
    if head[:4] == b"OggS":
        return ".ogg"
    if head[:4] == b"FORM":
        return ".aiff"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return ".mp3"
    return ".wav"


# ---------------------------------------------------------------------------------------------
# lhotse
# ---------------------------------------------------------------------------------------------
def _sibling(path: Path, old: str, new: str) -> Path | None:
    if old not in path.name:
        return None
    cand = path.with_name(path.name.replace(old, new))
    return cand if cand.is_file() else None


def read_lhotse(source: str | Path, supervisions: str | Path | None = None,
                audio_cache: str | Path | None = None) -> Table:
    """Read a lhotse manifest (see the module docstring) into a :class:`Table`."""
    _require("lhotse", "lhotse", "lhotse manifests")
    from lhotse import CutSet, RecordingSet, SupervisionSet, load_manifest

    source = Path(source)
    cache = AudioCache(audio_cache)

    def load(p: Path):
        try:
            return load_manifest(p)
        except Exception as exc:  # noqa: BLE001 - lhotse raises several types for bad files
            raise ManifestError(f"{p}: cannot read as a lhotse manifest: {type(exc).__name__}: {exc}") from None

    obj = load(source)
    files = [source]
    if isinstance(obj, CutSet):
        return _lhotse_cuts(obj, source, cache)
    if isinstance(obj, SupervisionSet):
        sups = obj
        rec_path = _sibling(source, "supervisions", "recordings")
        if rec_path is None:
            raise ManifestError(f"{source} is a lhotse SupervisionSet: its recordings are needed too, but there is no "
                                f"{source.name.replace('supervisions', 'recordings')} beside it; pass the recordings "
                                "file as --manifest (the supervisions beside it are found by name)")
        recs = load(rec_path)
        files = [rec_path, source]
    elif isinstance(obj, RecordingSet):
        recs = obj
        sup_path = Path(supervisions) if supervisions else _sibling(source, "recordings", "supervisions")
        sups = load(sup_path) if sup_path else None
        if sup_path:
            files.append(sup_path)
    else:
        raise ManifestError(f"{source}: a lhotse {type(obj).__name__} cannot be a manifest; give a RecordingSet "
                            "(+ SupervisionSet beside it) or a CutSet")
    if sups is not None and not isinstance(sups, SupervisionSet):
        raise ManifestError(f"{files[-1]} holds a lhotse {type(sups).__name__}, not a SupervisionSet")
    if not isinstance(recs, RecordingSet):
        raise ManifestError(f"{files[0]} holds a lhotse {type(recs).__name__}, not a RecordingSet")
    digest = hashlib.sha256(b"lhotse|" + b"|".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    base = source.parent
    by_id = {r.id: r for r in recs}
    audio: dict[str, tuple[str, str, str]] = {}

    def recording_audio(rec) -> tuple[str, str, str]:
        if rec.id not in audio:
            audio[rec.id] = _recording_path(rec, base, cache)
        return audio[rec.id]

    records: list[tuple[str, int, dict[str, Any]]] = []
    fields: list[str] = ["id", "path", "start", "end", "speaker", "recording_id"]
    if sups is None:
        for n, rec in enumerate(recs, start=1):
            path, status, error = recording_audio(rec)
            records.append((f"recording '{rec.id}'", n, _with_problem({"id": rec.id, "path": path, "recording_id": rec.id},
                                                                       status, error, f"recording '{rec.id}'")))
        return Table(str(source), ["id", "path", "recording_id"], records, digest)
    used_recs: set[str] = set()
    for n, sup in enumerate(sups, start=1):
        where = f"supervision '{sup.id}'"
        rec = by_id.get(sup.recording_id)
        rec_d: dict[str, Any] = {"id": sup.id, "start": sup.start, "end": sup.end, "speaker": sup.speaker,
                                 "recording_id": sup.recording_id}
        _supervision_fields(sup, rec_d, fields)
        if rec is None:
            rec_d["path"] = ""
            rec_d = _with_problem(rec_d, "missing", f"recording '{sup.recording_id}' is not in {files[0].name}", where)
        else:
            used_recs.add(rec.id)
            path, status, error = recording_audio(rec)
            rec_d["path"] = path
            rec_d = _with_problem(rec_d, status, error, where)
        records.append((where, n, rec_d))
    for rec in recs:
        if rec.id not in used_recs:
            where = f"recording '{rec.id}'"
            path, _, _ = recording_audio(rec)
            records.append((where, len(records) + 1, _with_problem(
                {"id": rec.id, "path": path, "recording_id": rec.id}, "no_segment",
                f"no supervision in {files[-1].name} refers to this recording", where)))
    return Table(str(source), fields, records, digest)


def _with_problem(rec: dict[str, Any], status: str, error: str, where: str) -> dict[str, Any]:
    if status:
        rec["_status"], rec["_error"] = status, f"{where}: {error}"
    return rec


def _supervision_fields(sup, rec: dict[str, Any], fields: list[str]) -> None:
    """text / language / gender and every custom field -> columns (first seen order)."""
    for key in ("text", "language", "gender"):
        value = getattr(sup, key, None)
        if value is not None:
            rec[key] = value
            if key not in fields:
                fields.append(key)
    for key, value in (sup.custom or {}).items():
        name = key if key not in ("id", "path", "start", "end", "recording_id", "text", "language", "gender") else f"custom_{key}"
        if name == "speaker" and sup.speaker:
            name = "custom_speaker"
        rec[name] = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, sort_keys=True)
        if name not in fields:
            fields.append(name)


def _recording_path(rec, base: Path, cache: AudioCache) -> tuple[str, str, str]:
    """``(path, status, error)``: the recording's own file when it is one plain file, else a copy
    in the audio cache (written through lhotse)."""
    sources = list(rec.sources)
    if len(sources) == 1 and sources[0].type == "file" and not rec.transforms:
        p = Path(str(sources[0].source))
        if not p.is_absolute():
            p = base / p if (base / p).exists() or not p.exists() else p
        return str(p), "", ""
    desc = json.dumps(rec.to_dict(), sort_keys=True, default=str)
    try:
        return str(cache.put_decoded(desc, rec.id, lambda: (rec.load_audio(), rec.sampling_rate))), "", ""
    except Exception as exc:  # noqa: BLE001 - any lhotse loading failure is this row's problem
        return "", "unreadable", f"lhotse cannot load the audio: {type(exc).__name__}: {exc}"


def _lhotse_cuts(cuts, source: Path, cache: AudioCache) -> Table:
    digest = hashlib.sha256(b"lhotse-cuts|" + hashlib.sha256(source.read_bytes()).digest()).hexdigest()
    base = source.parent
    fields: list[str] = ["id", "path", "start", "end", "speaker", "recording_id", "cut_id"]
    records: list[tuple[str, int, dict[str, Any]]] = []
    partial = 0
    for n, cut in enumerate(cuts, start=1):
        where = f"cut '{cut.id}'"
        rec = getattr(cut, "recording", None)
        whole = (rec is not None and getattr(cut, "start", None) == 0 and abs(cut.duration - rec.duration) < 1e-6
                 and type(cut).__name__ == "MonoCut")
        if whole:
            path, status, error = _recording_path(rec, base, cache)
        else:
            desc = json.dumps(cut.to_dict(), sort_keys=True, default=str)
            try:
                path, status, error = str(cache.put_decoded(desc, cut.id, lambda: (cut.load_audio(), cut.sampling_rate))), "", ""
            except Exception as exc:  # noqa: BLE001
                path, status, error = "", "unreadable", f"lhotse cannot load the cut's audio: {type(exc).__name__}: {exc}"
        inside = [s for s in cut.supervisions if s.start >= -1e-6 and s.end <= cut.duration + 1e-6]
        partial += len(cut.supervisions) - len(inside)
        rec_id = rec.id if rec is not None else ""
        if not inside:
            records.append((where, n, _with_problem({"id": cut.id, "path": path, "recording_id": rec_id, "cut_id": cut.id},
                                                    status, error, where)))
            continue
        for sup in inside:
            d: dict[str, Any] = {"id": sup.id, "path": path, "start": max(0.0, sup.start), "end": min(sup.end, cut.duration),
                                 "speaker": sup.speaker, "recording_id": sup.recording_id, "cut_id": cut.id}
            _supervision_fields(sup, d, fields)
            records.append((f"{where}, supervision '{sup.id}'", n, _with_problem(d, status, error, where)))
    notes = []
    if partial:
        notes.append(f"{source}: {partial} supervision(s) lie only partly inside their cut and are not used "
                     "(each supervision wholly inside a cut is one item)")
    return Table(str(source), fields, records, digest, warnings=notes)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------
def read_hf_dataset(source: str | Path, split: str | None = None, audio_cache: str | Path | None = None,
                    audio_column: str | None = None) -> Table:
    """Read a ``save_to_disk`` folder (Dataset or DatasetDict) into a :class:`Table`."""
    datasets = _require("datasets", "datasets", "Hugging Face datasets")
    source = Path(source)
    cache = AudioCache(audio_cache)
    from datasets.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            obj = datasets.load_from_disk(str(source))
        except Exception as exc:  # noqa: BLE001 - datasets raises several types for bad folders
            raise ManifestError(f"{source}: cannot read as a Hugging Face dataset: {type(exc).__name__}: {exc}") from None
        if isinstance(obj, datasets.DatasetDict):
            if split is not None:
                if split not in obj:
                    raise ManifestError(f"{source}: no split '{split}' (splits: {', '.join(obj.keys())})")
                parts = [(split, obj[split])]
            else:
                parts = list(obj.items())
            with_split = split is None
        else:
            if split is not None and str(obj.split or "") != split:
                raise ManifestError(f"{source} is a single Dataset (split '{obj.split}'), not a DatasetDict: "
                                    f"drop --split {split}")
            parts, with_split = [(str(obj.split or ""), obj)], False
        return _hf_table(datasets, source, parts, with_split, cache, audio_column)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hf_table(datasets, source: Path, parts, with_split: bool, cache: AudioCache, audio_column: str | None) -> Table:
    import numpy as np

    features = parts[0][1].features
    for name, ds in parts[1:]:
        if ds.features != features:
            raise ManifestError(f"{source}: splits '{parts[0][0]}' and '{name}' have different columns; pick one with --split")
    audio_cols = [c for c, f in features.items() if isinstance(f, datasets.Audio)]
    if audio_column is None:
        if len(audio_cols) > 1:
            raise ManifestError(f"{source}: several Audio columns ({', '.join(audio_cols)}); choose one with --columns path=COLUMN")
        audio_column = audio_cols[0] if audio_cols else ("path" if "path" in features else None)
    if audio_column is None:
        raise ManifestError(f"{source}: no Audio column (columns: {', '.join(features)}); name the column holding the "
                            "audio or its file path with --columns path=COLUMN")
    if audio_column not in features:
        raise ManifestError(f"{source}: column mapping path={audio_column}: no such column (columns: {', '.join(features)})")
    is_audio = isinstance(features[audio_column], datasets.Audio)
    scalar = (datasets.Value, datasets.ClassLabel)
    kept = [c for c, f in features.items() if c != audio_column and isinstance(f, scalar)]
    dropped = [c for c in features if c != audio_column and c not in kept]
    notes = []
    if dropped:
        notes.append(f"{source}: column{'s' if len(dropped) > 1 else ''} {', '.join(repr(c) for c in dropped)} "
                     f"{'are' if len(dropped) > 1 else 'is'} not a single value per row (audio, sequence, image...) "
                     "and not kept")
    decoders = {c: f for c, f in features.items() if c in kept and isinstance(f, datasets.ClassLabel)}
    short_floats = {c for c, f in features.items() if c in kept and isinstance(f, datasets.Value)
                    and f.dtype in ("float16", "float32")}
    header = ([audio_column] + kept + ["source_path"] + (["split"] if with_split else []))
    if "source_path" in kept or (with_split and "split" in kept):
        raise ManifestError(f"{source}: a column is named 'source_path' or 'split', which this reader adds; rename it")
    h = hashlib.sha256(b"hf|" + json.dumps({c: str(f) for c, f in features.items()}, sort_keys=True).encode())
    records: list[tuple[str, int, dict[str, Any]]] = []
    base = source
    for split_name, ds in parts:
        if is_audio:
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        i = 0
        for batch in ds.iter(batch_size=256):
            n_rows = len(batch[audio_column])
            for j in range(n_rows):
                where = f"{split_name + ' ' if with_split else ''}row {i}"
                rec: dict[str, Any] = {}
                for c in kept:
                    v = batch[c][j]
                    if c in decoders:
                        v = decoders[c].int2str(int(v)) if v is not None and int(v) >= 0 else ""
                    elif c in short_floats and v is not None:
                        v = str(np.float32(v))  # 0.1, not 0.10000000149011612
                    rec[c] = v
                value = batch[audio_column][j]
                path, orig, digest_part, problem = _hf_audio(value, is_audio, i, cache)
                rec[audio_column] = path
                rec["source_path"] = orig
                if with_split:
                    rec["split"] = split_name
                stem = Path(orig).stem if orig else str(i)
                rec["_id"] = f"{split_name}-{stem}" if with_split else stem
                if problem:
                    rec["_status"], rec["_error"] = "bad_row", f"{where}: {problem}"
                h.update(json.dumps([split_name, i, digest_part, {c: str(rec[c]) for c in kept}], sort_keys=True).encode())
                records.append((where, i + 1, rec))
                i += 1
    return Table(str(source), header, records, h.hexdigest(), resolve_path=lambda p: str(Path(p)),
                 warnings=notes, default_mapping={"path": audio_column})


def _hf_audio(value: Any, is_audio: bool, i: int, cache: AudioCache) -> tuple[str, str, str, str]:
    """``(path to read, original path, content for the hash, problem)`` of one Audio value."""
    if not is_audio:
        p = "" if value is None else str(value)
        return p, p, p, "" if p else "empty audio path"
    if value is None:
        return "", "", "", "no audio (the Audio value is empty)"
    data, orig = value.get("bytes"), value.get("path") or ""
    if data:
        target = cache.put_bytes(bytes(data), Path(orig).stem if orig else f"row{i}", Path(orig).suffix)
        return str(target), orig, hashlib.sha256(bytes(data)).hexdigest(), ""
    if orig:
        return orig, orig, orig, ""
    return "", "", "", "the Audio value has neither bytes nor a path"

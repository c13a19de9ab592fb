"""Extraction: manifest -> audio -> length-aware batches -> encoder -> HDF5 store.

Resumable: the store is written batch by batch to ``<out>.partial`` under a deterministic batch
plan; running the same command again skips the batches already committed, so the result equals an
uninterrupted run. Bad input becomes a per-item status and never stops the run.
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featstore.audio import AudioError, Clip, load_audio, probe_duration
from featstore.encoders.base import Encoder
from featstore.manifest import Manifest, ManifestWarning, Row, read_manifest
from featstore.store import OK, StoreWriter, partial_path

DEFAULT_CACHE = Path("cache")


@dataclass
class ExtractResult:
    """What one extraction did (also what the CLI prints)."""

    path: Path
    items: int
    ok: int
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, status, message)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (id, note)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    frames: int = 0
    padded_frames: int = 0
    resumed: bool = False
    already_done: bool = False
    interrupted: bool = False

    @property
    def padded_fraction(self) -> float:
        total = self.frames + self.padded_frames
        return self.padded_frames / total if total else 0.0


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``all`` | ``0-4,8,-1`` -> sorted layer indices (``-1`` = last)."""
    if spec.strip().lower() in ("all", ""):
        return list(range(num_layers))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                out.update(range(a, b + 1))
            else:
                k = int(part)
                out.add(k if k >= 0 else num_layers + k)
        except ValueError:
            raise ValueError(f"bad layer spec {spec!r}: use 'all', '0-12' or '0,4,8'") from None
    bad = sorted(k for k in out if not 0 <= k < num_layers)
    if bad:
        raise ValueError(f"layers {bad} do not exist: this encoder has layers 0..{num_layers - 1}")
    return sorted(out)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)`` (1-based shard index)."""
    if not spec:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"bad shard {spec!r}: use K/N with 1 <= K <= N, e.g. --shard 1/4")
    return int(m.group(1)), int(m.group(2))


def shard_rows(n_rows: int, shard: tuple[int, int] | None) -> list[int]:
    """Manifest rows of shard K/N: every N-th row starting at K-1 (deterministic, balanced)."""
    if shard is None:
        return list(range(n_rows))
    k, n = shard
    return list(range(k - 1, n_rows, n))


def plan_batches(
    lengths: Sequence[int],
    batch_seconds: float,
    sample_rate: int,
    max_items: int = 512,
    frames_of: Callable[[int], int] | None = None,
    max_padding: float = 0.05,
) -> list[list[int]]:
    """Length-aware batches: sort by length, cut when ``len(batch) * longest`` exceeds the budget
    or, given ``frames_of``, when padded frames would exceed ``max_padding`` of the batch's frames.

    Deterministic for given lengths (ties broken by position), so a resumed run re-creates the
    same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    budget = max(1, int(batch_seconds * sample_rate))
    frames = [frames_of(n) if frames_of else 0 for n in lengths]
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_frames = 0
    for i in order:
        longest = max(lengths[i], 1)
        padded = (len(cur) + 1) * frames[i] - (cur_frames + frames[i])
        too_padded = frames_of is not None and padded > max_padding * (len(cur) + 1) * max(frames[i], 1)
        if cur and ((len(cur) + 1) * longest > budget or len(cur) >= max_items or too_padded):
            batches.append(cur)
            cur, cur_frames = [], 0
        cur.append(i)
        cur_frames += frames[i]
    if cur:
        batches.append(cur)
    return batches


def default_out(model: str, manifest: str | Path, shard: tuple[int, int] | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name if Path(model).exists() else model).strip("-")
    stem = Path(manifest).stem if Path(manifest).is_file() else Path(manifest).name
    suffix = f".shard{shard[0]}of{shard[1]}" if shard else ""
    return DEFAULT_CACHE / f"{slug}__{stem}{suffix}.h5"


def segment_frames(encoder: Encoder, num_frames: int, start: float, end: float, offset_s: float = 0.0) -> tuple[int, int]:
    """Half-open frame range whose centres lie in ``[start, end)`` seconds (relative to the audio
    that was encoded, which begins at ``offset_s``)."""
    sr, c0, hop = encoder.sample_rate, encoder.first_frame_center_samples, encoder.frame_stride_samples
    a = math.ceil(((start - offset_s) * sr - c0) / hop - 1e-9)
    b = math.ceil(((end - offset_s) * sr - c0) / hop - 1e-9)
    return int(min(max(a, 0), num_frames)), int(min(max(b, 0), num_frames))


def _versions() -> dict[str, str]:
    import h5py
    import torch
    import transformers

    from featstore import __version__

    return {"featstore": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__}


class _Loader:
    """Decodes rows (crop or whole clip) at the encoder's rate; runs in a background thread."""

    def __init__(self, encoder: Encoder, crop_to_segment: bool):
        self.encoder = encoder
        self.crop = crop_to_segment

    def __call__(self, row: Row) -> Clip | AudioError:
        try:
            if self.crop and row.start is not None:
                clip = load_audio(row.path, self.encoder.sample_rate, row.start, row.end)
                clip.note = ", ".join(filter(None, [clip.note, f"cropped to [{row.start:.3f}, {row.end:.3f}) s"]))
            else:
                clip = load_audio(row.path, self.encoder.sample_rate)
        except AudioError as exc:
            return exc
        n = len(clip.samples)
        if self.encoder.num_frames(n) == 0:
            need = self.encoder.min_samples()
            return AudioError(
                "too_short",
                f"{n / clip.sample_rate:.3f} s ({n} samples at {clip.sample_rate} Hz) is shorter than one frame "
                f"of this encoder ({need} samples)",
            )
        limit = getattr(self.encoder, "max_samples", None)
        if limit and n > limit:
            return AudioError("too_long", f"{n / clip.sample_rate:.2f} s is longer than this encoder's window "
                              f"({limit / clip.sample_rate:.2f} s); cut the clip or use segments with --crop-to-segment")
        if row.start is not None and not self.crop and row.start * clip.sample_rate >= n:
            return AudioError("bad_segment", f"segment starts at {row.start:.3f} s, after the clip ends ({n / clip.sample_rate:.3f} s)")
        return clip


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def encode_with_backoff(encoder: Encoder, clips: list[np.ndarray], on_split: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
    """``encoder.encode`` that halves the batch and retries on out-of-memory (no clip is lost)."""
    try:
        return encoder.encode(clips)
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if not is_oom(exc) or len(clips) == 1:
            raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_split:
            on_split(len(clips))
        mid = len(clips) // 2
        return encode_with_backoff(encoder, clips[:mid], on_split) + encode_with_backoff(encoder, clips[mid:], on_split)


def extract(
    manifest: str | Path | Manifest,
    model: str | Encoder,
    out: str | Path | None = None,
    *,
    group_column: str = "speaker",
    layers: str = "all",
    device: str = "auto",
    batch_seconds: float = 60.0,
    dtype: str = "float32",
    crop_to_segment: bool = False,
    textgrid_tier: str | None = None,
    textgrid_labels: Sequence[str] | None = None,
    columns: dict[str, str] | str | None = None,
    manifest_format: str = "auto",
    split: str | None = None,
    audio_cache: str | Path | None = None,
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    audit_clips: int = 8,
    encoder_options: dict[str, Any] | None = None,
    progress: bool = True,
    console: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Extract every layer of ``model`` for every clip of ``manifest`` into an HDF5 store.

    ``model``: an alias (``wavlm-base-plus``), hub id, model directory, front-end name
    (``logmel``/``mfcc``/``spectral``) or a ready :class:`Encoder`. Returns an
    :class:`ExtractResult`; per-item problems are listed there and in the store's ``items/``.
    ``on_batch(i)`` is called after batch ``i`` is committed (a hook for progress or tests).
    ``columns``, ``manifest_format``, ``split`` and ``audio_cache`` go to
    :func:`featstore.manifest.read_manifest` (column mapping, lhotse / Hugging Face sources).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # shown once, on the run's console, just below
        warnings.simplefilter("ignore", ManifestWarning)
        man = manifest if isinstance(manifest, Manifest) else read_manifest(
            manifest, group_column, textgrid_tier, list(textgrid_labels) if textgrid_labels else None,
            columns=columns, format=manifest_format, split=split, audio_cache=audio_cache)
    for msg in man.warnings:
        console.print(f"[yellow]warning:[/] {escape(msg)}")
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    rows_idx = shard_rows(len(man.rows), shard_t)
    rows = [man.rows[i] for i in rows_idx]
    if isinstance(model, Encoder):
        encoder = model
    else:
        from featstore.encoders.registry import load_encoder

        encoder = load_encoder(model, device=device, **(encoder_options or {}))
    layer_ids = parse_layers(layers, encoder.num_layers)
    out = Path(out) if out else default_out(encoder.name if isinstance(model, Encoder) else str(model), man.source, shard_t)
    if out.exists() and not overwrite:
        return ExtractResult(out, len(rows), -1, already_done=True)
    if out.exists():
        out.unlink()

    identity = {
        **encoder.describe(),
        "manifest_sha256": man.sha256,
        "dtype": dtype,
        "layer_ids": layer_ids,
        "crop_to_segment": bool(crop_to_segment),
        "shard": f"{shard_t[0]}/{shard_t[1]}" if shard_t else "",
        "shard_rows": rows_idx if shard_t else [],
        "group_column": man.group_column or "",
    }
    resumed = partial_path(out).exists()
    if resumed:
        writer = StoreWriter.resume(out, {k: v for k, v in identity.items() if k not in ("created_at",)})
    else:
        init = []
        for r in rows:
            d = {"id": r.id, "path": r.path, "label": r.label, "group": r.group, **r.extra}
            init.append(d)
        attrs = {**identity, "manifest": str(man.source), "created_at": datetime.now(timezone.utc).isoformat(),
                 "versions": _versions(), "padding_audit": {}, "batch_seconds": float(batch_seconds)}
        writer = StoreWriter.create(out, init, attrs, [encoder.layer_dims[k] for k in layer_ids], dtype, man.extra_columns,
                                    layer_ids=layer_ids)
        # rows rejected by manifest validation are committed at once
        bad = [(j, {"status": r.status, "error": r.error}, None) for j, r in enumerate(rows) if r.status]
        if bad:
            writer.write_items(bad)

    result = ExtractResult(out, len(rows), 0, resumed=resumed)
    loader = _Loader(encoder, crop_to_segment)
    try:
        pending = set(int(i) for i in writer.pending_rows())
        if not resumed and audit_clips > 0:
            _audit(writer, encoder, loader, [rows[j] for j in sorted(pending)], audit_clips)
        lengths = []
        for r in rows:
            dur = probe_duration(r.path) if not r.status else None
            if dur is not None and crop_to_segment and r.start is not None:
                dur = max(0.0, min(dur, r.end) - r.start)
            lengths.append(int(round((dur or 0.0) * encoder.sample_rate)))
        batches = [b for b in plan_batches(lengths, batch_seconds, encoder.sample_rate, frames_of=encoder.num_frames) if any(j in pending for j in b)]
        total_audio = sum(lengths[j] for b in batches for j in b if j in pending) / encoder.sample_rate
        _run_batches(writer, encoder, loader, rows, batches, pending, layer_ids, result, progress, console, total_audio, on_batch)
    except KeyboardInterrupt:
        writer.close()
        result.interrupted = True
        result.wall_seconds = time.perf_counter() - t0
        return result
    except BaseException:
        writer.close()
        raise
    stats = getattr(encoder, "stats", {})
    writer.set_attrs(extraction_stats={"frames": result.frames, "padded_frames": result.padded_frames,
                                       "wall_seconds": round(time.perf_counter() - t0, 3), **stats})
    _collect(writer, result)
    writer.finalize()
    result.wall_seconds = time.perf_counter() - t0
    return result


def _audit(writer: StoreWriter, encoder: Encoder, loader: _Loader, rows: list[Row], n: int) -> None:
    clips = []
    for r in rows:
        if len(clips) >= n:
            break
        if r.status:
            continue
        c = loader(r)
        if isinstance(c, Clip):
            clips.append(c.samples)
    audit = encoder.padding_audit(clips) if clips else {}
    writer.set_attrs(padding_audit=audit)


def _run_batches(writer, encoder, loader, rows, batches, pending, layer_ids, result, progress, console, total_audio, on_batch):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    n_items = sum(1 for b in batches for j in b if j in pending)
    t_start = time.perf_counter()
    done_audio = 0.0
    pool = ThreadPoolExecutor(max_workers=2)

    def decode(batch):
        todo = [j for j in batch if j in pending]
        return todo, list(pool.map(loader, [rows[j] for j in todo]))

    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("extract", total=n_items, rate="")
        future = pool.submit(decode, batches[0]) if batches else None
        for bi in range(len(batches)):
            todo, clips = future.result()
            future = pool.submit(decode, batches[bi + 1]) if bi + 1 < len(batches) else None
            entries = _encode_batch(encoder, rows, todo, clips, layer_ids, result, loader.crop)
            writer.write_items(entries)
            done_audio += sum(len(c.samples) for c in clips if isinstance(c, Clip)) / encoder.sample_rate
            el = max(time.perf_counter() - t_start, 1e-9)
            bar.update(task, advance=len(todo), rate=f"{bar.tasks[0].completed / el:.1f} clips/s  {done_audio / el:.2f} audio s/s")
            if on_batch:
                on_batch(bi)
    pool.shutdown(wait=False, cancel_futures=True)
    result.audio_seconds += done_audio


def _encode_batch(encoder, rows, todo, clips, layer_ids, result, crop: bool) -> list[tuple[int, dict, list | None]]:
    entries: list[tuple[int, dict, list | None]] = []
    good = [(j, c) for j, c in zip(todo, clips) if isinstance(c, Clip)]
    for j, c in zip(todo, clips):
        if isinstance(c, AudioError):
            entries.append((j, {"status": c.code, "error": c.message}, None))
    outputs: list[Any] = []
    if good:
        try:
            outputs = encode_with_backoff(encoder, [c.samples for _, c in good])
        except Exception:  # noqa: BLE001 - a batch that fails is retried clip by clip
            outputs = []
            for _, c in good:
                try:
                    outputs.append(encoder.encode([c.samples])[0])
                except Exception as exc:  # noqa: BLE001
                    outputs.append(exc)
    for (j, clip), out in zip(good, outputs):
        row = rows[j]
        fields = {"num_samples": len(clip.samples), "sha256": clip.sha256, "rms_db": clip.rms_db, "note": clip.note}
        if isinstance(out, Exception):
            entries.append((j, {**fields, "status": "encode_error", "error": f"{type(out).__name__}: {out}"}, None))
            continue
        frames = [out[k] for k in layer_ids]
        n = frames[0].shape[0]
        if row.start is not None and not crop:
            a, b = segment_frames(encoder, n, row.start, row.end)
            fields.update(segment_start_frame=a, segment_end_frame=b)
            if b <= a:
                fields["note"] = ", ".join(filter(None, [clip.note, "segment shorter than one frame: 0 segment frames"]))
        result.frames += n
        entries.append((j, {**fields, "status": OK}, frames))
    stats = getattr(encoder, "stats", None)
    if stats:
        result.padded_frames = int(stats.get("padded_frames", 0))
    return entries


def _collect(writer: StoreWriter, result: ExtractResult) -> None:
    items = writer.h5["items"]
    dec = lambda a: [v.decode() if isinstance(v, bytes) else str(v) for v in a]  # noqa: E731
    ids, status, error, note = (dec(items[c][:]) for c in ("id", "status", "error", "note"))
    result.ok = sum(s == OK for s in status)
    result.failures = [(i, s, e) for i, s, e in zip(ids, status, error) if s != OK]
    result.notes = [(i, n) for i, n, s in zip(ids, note, status) if n and s == OK]
    result.items = len(ids)


def extract_for_predict(manifest: str | Path, model: str, out: str | Path | None = None, **options: Any) -> Path:
    """Extract a manifest of new clips for ``probes predict`` (into ``cache/predict/`` by default)."""
    if out is None:
        out = DEFAULT_CACHE / "predict" / default_out(model, manifest).name
    res = extract(manifest, model, out, **options)
    return res.path

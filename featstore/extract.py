"""Extraction: manifest -> audio -> length-aware batches -> encoder -> HDF5 store.

Crash-safe and resumable: the batch plan is fixed when a run starts and recorded in its batch
directory ``<out>.partial/``; every batch is committed atomically as its own file
(:class:`featstore.store.StoreWriter`), so after a kill at any instant running the same command
again redoes at most the two batches in flight (the one being encoded and the one whose commit had
not finished) and gives a store equal to an uninterrupted run, bit for bit. SIGTERM stops once the
batch being encoded is committed. A finished store is reused only when its
identity (encoder, manifest content, settings) equals the run's. One writer per store
(:class:`featstore.writelock.WriterLock`). Bad input becomes a per-item status and never stops
the run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.markup import escape

from featstore.audio import AudioError, Clip, load_audio, probe_duration
from featstore.encoders.base import Encoder
from featstore.manifest import Manifest, ManifestWarning, Row, check_column_names, read_manifest
from featstore.store import (FORMAT_VERSION, OK, PartialDamaged, StoreMismatch, StoreWriter, describe_diff,
                             discard_partial, identity_diff, open_store, partial_path, read_partial_attrs)
from featstore.writelock import WriterLock

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
    #: what stopped an interrupted run: "interrupt" (Ctrl-C) or "SIGTERM"
    stopped_by: str = ""
    #: items encoded by this call (a resumed run skips the committed ones)
    processed: int = 0
    #: where this call's time went (seconds; ``first_batch_unix``: when the first batch's encode
    #: began, for time-to-first-batch from the shell); also stored in ``extraction_stats``
    timings: dict[str, float] = field(default_factory=dict)
    #: ``time.perf_counter()`` when the call began (time to first batch is measured from it)
    started_perf: float = field(default=0.0, repr=False)

    @property
    def padded_fraction(self) -> float:
        total = self.frames + self.padded_frames
        return self.padded_frames / total if total else 0.0


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``all`` | ``0-4,8,-1`` -> sorted layer indices of an encoder with ``num_layers`` hidden states
    (``-1`` = last), through the one layer-spec parser, :mod:`featstore.layerspec`."""
    from featstore.layerspec import resolve_layers

    return resolve_layers(spec, range(num_layers), what="this encoder")


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
    """Library versions for provenance (transformers' from its metadata: importing it costs ~1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    import h5py
    import torch

    from featstore import __version__

    try:
        tf = version("transformers")
    except PackageNotFoundError:
        tf = "not installed"
    return {"featstore": __version__, "torch": torch.__version__, "transformers": tf,
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


class _Stopped(Exception):
    """SIGTERM was received; the run stops at a batch boundary."""


class _StopSignal:
    """While active (main thread only), SIGTERM sets :attr:`signum` instead of killing the
    process, so the batch loop stops cleanly once the batch being encoded is committed; the old handler is
    restored afterwards."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: Any = None

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except (ValueError, OSError):
                self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


#: where each encoder option applies (for the error when it is given to another encoder)
_OPTION_SCOPE = {
    "context_seconds": ("--context-seconds", "Whisper encoders"),
    "amp": ("--amp", "wav2vec2-family SSL models (wav2vec2, HuBERT, WavLM, data2vec-audio)"),
}


def _load_encoder(model: str, device: str, options: dict[str, Any]) -> Encoder:
    """``load_encoder`` with an option that this kind of encoder does not take named as such."""
    from featstore.encoders.registry import load_encoder

    try:
        return load_encoder(model, device=device, **options)
    except TypeError as exc:
        m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(exc))
        if not m or m.group(2) not in options:
            raise
        flag, scope = _OPTION_SCOPE.get(m.group(2), (f"--{m.group(2).replace('_', '-')}", "other encoders"))
        raise ValueError(f"{flag} does not apply to model {model!r} (loaded as {m.group(1)}); it is for {scope} only") from None


def run_identity(encoder: Encoder, man: Manifest, *, dtype: str, layer_ids: Sequence[int], crop_to_segment: bool,
                 shard: tuple[int, int] | None, rows_idx: Sequence[int],
                 padding: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a store must match to be reused for (or resumed by) this run.

    ``padding``: the padded recipe's settings (``--emulate-padding``, :func:`padding_settings`); such
    a run has ``padding_exact = False`` and ``padding_emulation`` in its identity, so a padded store
    is never reused as an exact one, nor one padded otherwise (an exact run's identity is unchanged).
    A random-init control differs through ``encoder_revision`` and ``control`` (from the encoder).
    """
    extra = {"padding_exact": False, "padding_emulation": dict(padding)} if padding is not None else {}
    return {
        **encoder.describe(),
        "manifest_sha256": man.sha256,
        "rows_digest": rows_digest(man, rows_idx),
        "dtype": dtype,
        "layer_ids": list(layer_ids),
        "crop_to_segment": bool(crop_to_segment),
        "shard": f"{shard[0]}/{shard[1]}" if shard else "",
        "shard_rows": list(rows_idx) if shard else [],
        "group_column": man.group_column or "",
        "amp": getattr(encoder, "amp", None) or "fp32",
        "format_version": FORMAT_VERSION,
        **extra,
    }


def rows_digest(man: Manifest, rows_idx: Sequence[int]) -> str:
    """A digest of the rows this run extracts, as parsed: for each row its manifest position, id,
    file name (not the folder: a project moved as a whole keeps its stores), label, group, segment,
    extra columns and validation status are hashed with sha256, and the row hashes are summed modulo
    2**256 (64 hex digits), so the digests of shards add up to the whole manifest's (``featstore
    merge``). It changes when a TextGrid beside a clip, a lhotse/Hugging Face source or the reader's
    parse changes although the manifest file itself did not."""
    total = 0
    for i in rows_idx:
        r = man.rows[i]
        row = json.dumps([int(i), r.id, os.path.basename(str(r.path or "")), r.label, r.group, r.start, r.end,
                          sorted(r.extra.items()), r.status], ensure_ascii=False, default=str)
        total += int(hashlib.sha256(row.encode("utf-8", "surrogatepass")).hexdigest(), 16)
    return f"{total % 2**256:064x}"


# ---------------------------------------------------------------------------------------------
# --emulate-padding: the common recipe as a measured store
# ---------------------------------------------------------------------------------------------
def check_padding_options(emulate_padding: float | None, keep_padding: bool) -> float | None:
    """``--emulate-padding SECONDS`` (a positive, finite number) and ``--keep-padding`` (only with it)."""
    if emulate_padding is None:
        if keep_padding:
            raise ValueError("--keep-padding needs --emulate-padding SECONDS (it keeps the padded frames of that recipe)")
        return None
    try:
        seconds = float(emulate_padding)
    except (TypeError, ValueError):
        raise ValueError(f"--emulate-padding must be a number of seconds, got {emulate_padding!r}") from None
    if isinstance(emulate_padding, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--emulate-padding must be a positive number of seconds, got {emulate_padding!r}")
    return seconds


def padding_settings(encoder: Encoder, pad_seconds: float, keep_padding: bool) -> dict[str, Any]:
    """The padded recipe's settings (identity ``padding_emulation``); ``ValueError`` when ``encoder``
    has no padded path or ``pad_seconds`` gives no frame / does not fit its window."""
    if not hasattr(encoder, "padded_pipeline"):
        raise ValueError(f"--emulate-padding is not available for {type(encoder).__name__} (no padded path)")
    n_pad = int(round(pad_seconds * encoder.sample_rate))
    if encoder.num_frames(n_pad) == 0:
        raise ValueError(f"--emulate-padding {pad_seconds:g} s is shorter than one frame of this encoder "
                         f"({encoder.min_samples() / encoder.sample_rate:g} s)")
    limit = getattr(encoder, "max_samples", None)
    if limit and n_pad > limit:
        raise ValueError(f"--emulate-padding {pad_seconds:g} s is longer than this encoder's window "
                         f"({limit / encoder.sample_rate:g} s)")
    mask = getattr(encoder, "padded_attention_mask", None)
    if mask is None:  # SSL models: the mask where the checkpoint's feature extractor returns one
        mask = bool(getattr(getattr(encoder, "feature_extractor", None), "return_attention_mask", False))
    return {"pad_seconds": float(pad_seconds), "keep_padding": bool(keep_padding), "attention_mask": bool(mask)}


class PaddedRecipe:
    """``encoder`` with :meth:`encode` replaced by its padded path (``encoder.padded_pipeline``):
    the frames of the common recipe instead of each clip's exact ones. Everything else (geometry,
    audit, stats) is the encoder's own. Clips longer than the encoder's window are cut like any
    other, so there is no ``max_samples`` limit. The padded batch is run in chunks of at most
    ``batch_seconds`` of padded audio (the plan's batches count true lengths, and 0.2-s clips padded
    to 1 s are five times longer); each clip's padded frames do not depend on its chunk."""

    max_samples = None

    def __init__(self, encoder: Encoder, settings: dict[str, Any], batch_seconds: float = 60.0):
        self.inner = encoder
        self.settings = dict(settings)
        self.chunk = max(1, int(float(batch_seconds) // float(settings["pad_seconds"])))

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "settings", "chunk"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        out: list[list[np.ndarray]] = []
        for a in range(0, len(clips), self.chunk):
            out += self.inner.padded_pipeline(clips[a : a + self.chunk], self.settings["pad_seconds"],
                                              self.settings["keep_padding"])
        return out

    def pad_frames(self) -> int:
        """Frames of a clip padded to the recipe's length (every item's count with ``keep_padding``)."""
        return int(self.inner.num_frames(int(round(self.settings["pad_seconds"] * self.inner.sample_rate))))


def _padding_recipe(writer: StoreWriter, encoder: PaddedRecipe) -> dict[str, Any]:
    """Root attribute ``padding_recipe``: the settings, the number of ok clips the recipe cut
    (``truncated``) and, with ``keep_padding``, every item's frame count (``frames_per_item``)."""
    cols = writer.item_columns()
    n_pad = int(round(encoder.settings["pad_seconds"] * encoder.sample_rate))
    truncated = int(((cols["status"] == OK) & (cols["num_samples"] > n_pad)).sum())
    recipe = {**encoder.settings, "truncated": truncated}
    if encoder.settings["keep_padding"]:
        recipe["frames_per_item"] = encoder.pad_frames()
    return recipe


def _variant_suffix(padding: dict[str, Any] | None, random_init: int | None) -> str:
    """What sets a default store name apart: ``.random-init0``, ``.padded1s``, ``.padded1s-kept``."""
    suffix = f".random-init{random_init}" if random_init is not None else ""
    if padding is not None:
        suffix += f".padded{padding['pad_seconds']:g}s" + ("-kept" if padding["keep_padding"] else "")
    return suffix


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
    rebuild_stale: bool = False,
    audit_clips: int = 8,
    encoder_options: dict[str, Any] | None = None,
    emulate_padding: float | None = None,
    keep_padding: bool = False,
    random_init: int | None = None,
    progress: bool = True,
    console: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Extract every layer of ``model`` for every clip of ``manifest`` into an HDF5 store.

    ``model``: an alias (``wavlm-base-plus``), hub id, model directory, front-end name
    (``logmel``/``mfcc``/``spectral``) or a ready :class:`Encoder`. Returns an
    :class:`ExtractResult`; per-item problems are listed there and in the store's ``items/``.

    An existing store is reused (``already_done``) only when its identity equals this run's;
    otherwise :class:`StoreMismatch` names the differing fields, unless ``overwrite`` (always
    rebuild) or ``rebuild_stale`` (rebuild when different): the new store is built aside and
    replaces the old one only when complete. An unfinished run of the same command is resumed.
    ``on_batch(i)`` is called after the i-th batch of this call is committed (progress, tests).
    ``columns``, ``manifest_format``, ``split`` and ``audio_cache`` go to
    :func:`featstore.manifest.read_manifest` (column mapping, lhotse / Hugging Face sources).

    ``emulate_padding=SECONDS``: store what the common recipe computes instead (every clip padded or
    cut to SECONDS, the full model on the padded batch, the attention mask only where the
    checkpoint's feature extractor returns one, each clip's true frames then cut out, or with
    ``keep_padding`` the whole padded sequence): ``padding_exact = False`` and the recipe in
    ``padding_recipe`` (JSON: ``pad_seconds``, ``keep_padding``, ``attention_mask``, ``truncated``).
    ``random_init=SEED``: the same architecture with seeded random weights, a control
    (``control = "random-init"``, ``random_init_seed``, ``encoder_revision = "random-init:SEED"``).
    Without ``out``, both get their own default name.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    if not (isinstance(batch_seconds, (int, float)) and math.isfinite(batch_seconds) and batch_seconds > 0):
        raise ValueError(f"--batch-seconds must be a positive number of seconds, not {batch_seconds!r}")
    pad_seconds = check_padding_options(emulate_padding, keep_padding)
    if random_init is not None:
        from featstore.encoders.registry import check_seed

        random_init = check_seed(random_init)
        if isinstance(model, Encoder):
            raise ValueError("--random-init needs a model name or directory, not a ready encoder")
    if isinstance(manifest, Manifest):
        man = manifest
        check_column_names(list(man.extra_columns), man.source)
    else:
        with warnings.catch_warnings():  # shown once, on the run's console, just below
            warnings.simplefilter("ignore", ManifestWarning)
            man = read_manifest(manifest, group_column, textgrid_tier, list(textgrid_labels) if textgrid_labels else None,
                                columns=columns, format=manifest_format, split=split, audio_cache=audio_cache)
    for msg in man.warnings:
        console.print(f"[yellow]warning:[/] {escape(msg)}")
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    rows_idx = shard_rows(len(man.rows), shard_t)
    rows = [man.rows[i] for i in rows_idx]
    name = model.name if isinstance(model, Encoder) else str(model)
    if out:
        out = Path(out)
    else:
        out = default_out(name, man.source, shard_t)
        suffix = _variant_suffix(None if pad_seconds is None else {"pad_seconds": pad_seconds, "keep_padding": keep_padding},
                                 random_init)
        out = out.with_name(out.stem + suffix + out.suffix)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give the store's file name, e.g. {out / 'features.h5'}")
    with WriterLock(out, "featstore extract") as lock:
        if lock.note:
            _note(console, lock.note)
        options = dict(encoder_options or {})
        if random_init is not None:
            options["random_init"] = random_init
        encoder = model if isinstance(model, Encoder) else _load_encoder(model, device, options)
        padding = None
        if pad_seconds is not None:
            padding = padding_settings(encoder, pad_seconds, keep_padding)
            encoder = PaddedRecipe(encoder, padding, batch_seconds)
        layer_ids = parse_layers(layers, encoder.num_layers)
        identity = run_identity(encoder, man, dtype=dtype, layer_ids=layer_ids, crop_to_segment=crop_to_segment,
                                shard=shard_t, rows_idx=rows_idx, padding=padding)
        if out.exists():
            fields = _finished_diff(out, identity)
            if not fields and not overwrite:
                _drop_leftover(out, identity)
                return _finished_result(out, already_done=True)
            if fields and not (overwrite or rebuild_stale):
                what = (f"exists but {fields[0][1]}" if fields[0][0] == "store" else
                        f"was built with other inputs or settings — {describe_diff(fields, 'the store')}")
                raise StoreMismatch(f"{out} {what}; rebuild it with --overwrite (the new store replaces it only once "
                                    "complete) or write to another --out", fields)
            if fields and not overwrite:
                _note(console, f"{out} is out of date ({describe_diff(fields, 'the store')}): rebuilding it; it is "
                      "replaced when the new one is complete")
        writer, resumed = _open_run(out, identity, man, rows, encoder, layer_ids, dtype, batch_seconds,
                                    crop_to_segment, overwrite or rebuild_stale, console)
        result = ExtractResult(out, len(rows), 0, resumed=resumed, started_perf=t0)
        loader = _Loader(encoder, crop_to_segment)
        stop = _StopSignal()
        try:
            with stop, _SameThreads(writer):
                bad = [(j, {"status": r.status, "error": r.error}, None) for j, r in enumerate(rows) if r.status]
                if bad and not writer.committed(0):  # rows rejected by manifest validation: batch 0
                    writer.write_items(bad, key=0)
                for attempt in (0, 1):
                    _run_batches(writer, encoder, loader, rows, layer_ids, result, progress, console, on_batch,
                                 stop, lock)
                    # after the batches: its cost (a padded forward) is not paid before the first
                    # one, and it computes while the final file's layers are copied (I/O)
                    audit = audit_clips > 0 and "padding_audit" not in writer.extra_attrs
                    inputs = _audit_inputs(writer, encoder, loader, rows, audit_clips) if audit else None
                    t_fin = time.perf_counter()
                    writer.build_in_background()
                    try:
                        if audit:
                            t_audit = time.perf_counter()
                            writer.set_attrs(padding_audit=encoder.padding_audit(inputs[0], frames=inputs[1])
                                             if inputs[0] else {})
                            result.timings["audit"] = round(time.perf_counter() - t_audit, 4)
                        if padding is not None:
                            writer.set_attrs(padding_recipe=_padding_recipe(writer, encoder))
                        writer.set_attrs(extraction_stats={**_stats(writer, time.perf_counter() - t0, resumed),
                                                           "timings": result.timings})
                        t_wait = time.perf_counter()
                        writer.finalize()
                        result.timings["finalize_wait"] = round(time.perf_counter() - t_wait, 4)
                        result.timings["finalize"] = round(time.perf_counter() - t_fin, 4)
                        break
                    except PartialDamaged as exc:
                        if attempt:
                            raise
                        _note(console, f"{exc} — redoing it now")
                    finally:
                        writer.abandon_build()  # an error or a stop: the thread ends before we return
        except (KeyboardInterrupt, _Stopped):
            result.interrupted = True
            result.stopped_by = "SIGTERM" if stop.signum is not None else "interrupt"
            result.wall_seconds = time.perf_counter() - t0
            return result
    done = _finished_result(out)
    result.ok, result.failures, result.notes, result.items = done.ok, done.failures, done.notes, done.items
    result.wall_seconds = time.perf_counter() - t0
    return result


def _note(console: Any, message: str) -> None:
    """One yellow ``note:`` line (the message is printed as it is, not as markup)."""
    console.print(f"[yellow]note:[/] {escape(message)}")


def _finished_diff(out: Path, identity: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    try:
        with open_store(out) as store:
            have = dict(store.h5.attrs)
    except (OSError, ValueError) as exc:
        return [("store", f"cannot be read: {exc}", None)]
    return identity_diff(have, identity)


def _drop_leftover(out: Path, identity: dict[str, Any]) -> None:
    """A finished store's batch directory left behind by a kill during its clean-up."""
    if partial_path(out).is_dir():
        attrs = read_partial_attrs(out)
        if attrs is None or not identity_diff(attrs, identity):
            discard_partial(out)


def _finished_result(out: Path, already_done: bool = False) -> ExtractResult:
    with open_store(out) as store:
        ids, status, error, note = (store.column(c) for c in ("id", "status", "error", "note"))
    return ExtractResult(
        out, len(ids), int(sum(s == OK for s in status)),
        failures=[(i, s, e) for i, s, e in zip(ids, status, error) if s != OK],
        notes=[(i, n) for i, n, s in zip(ids, note, status) if n and s == OK],
        already_done=already_done,
    )


def _open_run(out, identity, man, rows, encoder, layer_ids, dtype, batch_seconds, crop, discard_other, console):
    """Resume the unfinished run of ``out`` or start one; returns ``(writer, resumed)``."""
    pp = partial_path(out)
    damaged = None
    if pp.exists() or pp.is_symlink():
        try:
            writer = StoreWriter.resume(out, expect=identity)
        except StoreMismatch as exc:
            if not discard_other:
                raise
            _note(console, f"discarded the unfinished run in {pp}: it was started with other settings "
                           f"({describe_diff(exc.fields, 'there')})")
        except PartialDamaged as exc:
            damaged = str(exc)
        else:
            console.print(escape(_resume_line(writer, rows, batch_seconds)))
            return writer, True
    lengths = []
    for r in rows:
        dur = probe_duration(r.path) if not r.status else None
        if dur is not None and crop and r.start is not None:
            dur = max(0.0, min(dur, r.end) - r.start)
        lengths.append(int(round((dur or 0.0) * encoder.sample_rate)))
    # the padding rule only matters where the transformer pads to the longest clip (a packed
    # forward computes true frames only, whatever the mix of lengths)
    plan = plan_batches(lengths, batch_seconds, encoder.sample_rate,
                        frames_of=None if getattr(encoder, "packed", False) else encoder.num_frames)
    init = [{"id": r.id, "path": r.path, "label": r.label, "group": r.group, **r.extra} for r in rows]
    attrs = {**identity, "identity_keys": sorted(identity), "manifest": str(man.source), "created_at": datetime.now(timezone.utc).isoformat(),
             "versions": _versions(), "padding_audit": {}, "batch_seconds": float(batch_seconds)}
    writer = StoreWriter.create(out, init, attrs, [encoder.layer_dims[k] for k in layer_ids], dtype, man.extra_columns,
                                layer_ids=layer_ids, plan=plan, settings=_run_settings(),
                                salvage=damaged is not None)
    if damaged is None:
        return writer, False
    kept = len(writer.batches)
    if kept:
        _note(console, f"{damaged}: kept the {kept} committed batch(es) that belong to this run, the rest is redone"
              + (f" ({len(writer.dropped)} other or damaged batch file(s) deleted)" if writer.dropped else ""))
    else:
        _note(console, f"{damaged}: nothing could be kept, starting over")
    return writer, kept > 0


def _run_settings() -> dict[str, Any]:
    """Settings a resumed run must reuse to give the same bits: the CPU thread count (float sums
    are split differently across threads: 1 vs 2 threads move base-size WavLM frames by ~3e-5)."""
    import torch

    return {"torch_threads": int(torch.get_num_threads())}


class _SameThreads:
    """Run with the thread count recorded by the run that started the store; restored after."""

    def __init__(self, writer: StoreWriter):
        self.want = writer.settings.get("torch_threads")
        self.before: int | None = None

    def __enter__(self) -> "_SameThreads":
        import torch

        if self.want and int(self.want) != torch.get_num_threads():
            self.before = torch.get_num_threads()
            torch.set_num_threads(int(self.want))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


def _expected_keys(writer: StoreWriter, rows: Sequence[Row]) -> list[int]:
    keys = [0] if any(r.status for r in rows) else []
    return keys + [bi + 1 for bi, b in enumerate(writer.plan or []) if any(not rows[j].status for j in b)]


def _resume_line(writer: StoreWriter, rows: Sequence[Row], batch_seconds: float) -> str:
    keys = _expected_keys(writer, rows)
    done = sum(writer.committed(k) for k in keys)
    line = f"resuming {writer.dir}: {done} of {len(keys)} batches already committed"
    if writer.dropped:
        name, why = writer.dropped[0]
        line += (f"; {len(writer.dropped)} damaged batch file(s) deleted and redone ({name}: {why}"
                 + (", ..." if len(writer.dropped) > 1 else "") + ")")
    if writer.attrs_damaged:
        line += f"; its attrs.json was damaged ({writer.attrs_damaged}) and is rebuilt"
    recorded = writer.attrs.get("batch_seconds")
    if recorded is not None and float(recorded) != float(batch_seconds):
        line += f"; keeping the first run's batch plan (--batch-seconds {float(recorded):g})"
    threads = writer.settings.get("torch_threads")
    if threads and int(threads) != _run_settings()["torch_threads"]:
        line += f"; using the first run's {int(threads)} torch thread(s) (this process has {_run_settings()['torch_threads']})"
    return line


def _stats(writer: StoreWriter, wall: float, resumed: bool) -> dict[str, Any]:
    """Extraction statistics: frames and padded frames summed over every committed batch (whichever
    run committed it), the number of batch commits, and the wall time of the call that finished."""
    frames = padded = 0
    for b in writer.batches.values():
        frames += int(b.header["stats"].get("frames", 0))
        padded += int(b.header["stats"].get("padded_frames", 0))
    return {"frames": frames, "padded_frames": padded, "batches": len(writer.batches),
            "wall_seconds": round(wall, 3), "resumed": bool(resumed)}


def _audit_inputs(writer: StoreWriter, encoder: Encoder, loader: _Loader, rows: Sequence[Row],
                  n: int) -> tuple[list[np.ndarray], list | None]:
    """The padding audit's first ``n`` clips and their padding-exact frames: this run's, read back
    from the committed batches when the store holds them exactly as the encoder returns them (every
    layer, float32, no padding recipe); otherwise ``None`` (the encoder computes them again)."""
    clips, chosen = [], []
    for j, r in enumerate(rows):
        if len(clips) >= n:
            break
        if r.status:
            continue
        c = loader(r)
        if isinstance(c, Clip):
            clips.append(c.samples)
            chosen.append(j)
    frames = None
    if (clips and not isinstance(encoder, PaddedRecipe) and writer.dtype == np.float32
            and list(writer.spec["layer_ids"]) == list(range(encoder.num_layers))):
        frames = [writer.item_frames(j) for j in chosen]
        if any(f is None for f in frames):
            frames = None
    return clips, frames


def _commit_writes_here(encoder: Encoder) -> bool:
    """Whether the batch loop's own thread checksums and writes each batch (the CPU computes)."""
    return str(getattr(encoder, "device", "cpu")) == "cpu"


def _run_batches(writer, encoder, loader, rows, layer_ids, result, progress, console, on_batch, stop, lock):
    """Encode and commit every planned batch that is not committed yet, in plan order.

    Three stages overlap: two threads decode batch ``n + 1`` while this one encodes batch ``n`` and
    one more finishes the commit of batch ``n - 1`` (:meth:`StoreWriter.write_items`). On the CPU
    that thread only waits for the disk (fsync, rename, directory fsync): the checksums and the
    write are done here, between two encodes, as a third busy thread would slow the two that
    compute; with an accelerator it does the whole commit. At most one commit is in flight and
    each is waited for before the next begins, so batches are committed in plan order, one at a
    time; ``on_batch(i)`` runs here once batch ``i`` is committed. When the run stops (SIGTERM,
    Ctrl-C, an error) the commit in flight is finished first: every batch whose commit began is
    kept.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    todo = [(bi, [j for j in b if not rows[j].status]) for bi, b in enumerate(writer.plan or [])]
    todo = [(bi, js) for bi, js in todo if js and not writer.committed(bi + 1)]
    if not todo:
        return
    columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    n_items = sum(len(js) for _, js in todo)
    t_start = time.perf_counter()
    t_call = result.started_perf or t_start
    timings = {"decode_wait": 0.0, "encode": 0.0, "write": 0.0, "sync": 0.0, "commit_wait": 0.0}
    write_here = _commit_writes_here(encoder)
    stats_before = {k: float(v) for k, v in (getattr(encoder, "stats", None) or {}).items() if k.endswith("_seconds")}
    done_audio = 0.0
    pool = ThreadPoolExecutor(max_workers=2)
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featstore-commit")
    pending: tuple[Any, int, int, float] | None = None  # (future, n, clips, audio seconds) of the commit in flight

    def decode(js):
        return list(pool.map(loader, [rows[j] for j in js]))

    def commit(entries, key, stats, finish=None):
        """In the commit thread: the whole commit, or its second half ``finish``; returns (write, sync) seconds."""
        t = time.perf_counter()
        if finish is None:
            finish = writer.write_items(entries, key=key, stats=stats, finish_later=True)
        t_sync = time.perf_counter()
        finish()
        lock.heartbeat()
        return t_sync - t, time.perf_counter() - t_sync

    def settle(bar, task):
        """Wait for the commit in flight (its error is raised here), then report it."""
        nonlocal pending, done_audio
        if pending is None:
            return
        fut, n, count, audio = pending
        pending = None
        t_wait = time.perf_counter()
        try:
            write, sync = fut.result()
            timings["write"] += write
            timings["sync"] += sync
        finally:
            timings["commit_wait"] += time.perf_counter() - t_wait
        result.processed += count
        done_audio += audio
        el = max(time.perf_counter() - t_start, 1e-9)
        bar.update(task, advance=count, rate=f"{bar.tasks[0].completed / el:.1f} clips/s  {done_audio / el:.2f} audio s/s")
        if on_batch:
            on_batch(n)

    try:
        with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
            task = bar.add_task("extract", total=n_items, rate="")
            try:
                future = pool.submit(decode, todo[0][1])
                for n, (bi, js) in enumerate(todo):
                    if stop.signum is not None:  # SIGTERM during the last batch (or the audit)
                        raise _Stopped
                    t_wait = time.perf_counter()
                    clips = future.result()
                    timings["decode_wait"] += time.perf_counter() - t_wait
                    if n == 0:
                        timings["first_batch_unix"] = time.time()
                        timings["first_batch_after_start"] = time.perf_counter() - t_call
                    future = pool.submit(decode, todo[n + 1][1]) if n + 1 < len(todo) else None
                    stats = getattr(encoder, "stats", None) or {}
                    padded_before = int(stats.get("padded_frames", 0))
                    t_enc = time.perf_counter()
                    entries = _encode_batch(encoder, rows, js, clips, layer_ids, result, loader.crop, writer.dtype)
                    timings["encode"] += time.perf_counter() - t_enc
                    frames = sum(0 if f is None else int(f[0].shape[0]) for _, _, f in entries)
                    padded = int((getattr(encoder, "stats", None) or {}).get("padded_frames", 0)) - padded_before
                    settle(bar, task)  # batch n - 1
                    audio = sum(len(c.samples) for c in clips if isinstance(c, Clip)) / encoder.sample_rate
                    batch_stats = {"frames": frames, "padded_frames": padded}
                    finish = None
                    if write_here:
                        t_write = time.perf_counter()
                        finish = writer.write_items(entries, key=bi + 1, stats=batch_stats, finish_later=True)
                        timings["write"] += time.perf_counter() - t_write
                    pending = (committer.submit(commit, entries, bi + 1, batch_stats, finish), n, len(js), audio)
                    del clips, entries
                settle(bar, task)
                if stop.signum is not None:
                    raise _Stopped
            except BaseException:
                if pending is not None:  # keep the batch being committed; an error of its own gives way
                    try:
                        settle(bar, task)
                    except BaseException:  # noqa: BLE001
                        pass
                raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        committer.shutdown(wait=True)  # nothing is written once this call returns
        result.audio_seconds += done_audio
        timings["batch_loop"] = time.perf_counter() - t_start
        for key in ("cnn_seconds", "transformer_seconds"):  # the encoder's own split, where it keeps one
            if key in (getattr(encoder, "stats", None) or {}):
                timings[key.replace("_seconds", "")] = float(encoder.stats[key]) - stats_before.get(key, 0.0)
        result.timings.update({k: round(v, 4) if k != "first_batch_unix" else v for k, v in timings.items()})


def _nonfinite_message(raw: list[np.ndarray], stored: list[np.ndarray], layer_ids: Sequence[int], dtype: np.dtype,
                       amp: str | None) -> str | None:
    """Why an item's frames cannot be stored (NaN/inf from the encoder or a float16 overflow), or ``None``."""
    bad = [k for k, f in zip(layer_ids, stored) if not np.isfinite(f).all()]
    if not bad:
        return None
    where = f"layer{'s' if len(bad) > 1 else ''} {', '.join(str(k) for k in bad)}"
    raw_bad = [f for k, f in zip(layer_ids, raw) if k in bad and not np.isfinite(f).all()]
    if not raw_bad:
        peak = max(float(np.abs(f).max()) for k, f in zip(layer_ids, raw) if k in bad)
        return (f"frames overflow {dtype} in {where} (|values| up to {peak:.3g}, above {float(np.finfo(dtype).max):.0f}); "
                "use --dtype float32")
    count = sum(int((~np.isfinite(f)).sum()) for f in raw_bad)
    hint = " (--amp fp16 can overflow: try --amp bf16 or fp32)" if amp == "fp16" else ""
    return f"the encoder returned {count} NaN/inf values in {where}{hint}"


def _encode_batch(encoder, rows, todo, clips, layer_ids, result, crop: bool, dtype: np.dtype = np.dtype("float32")):
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
    amp = getattr(encoder, "amp", None)
    for (j, clip), out in zip(good, outputs):
        row = rows[j]
        fields = {"num_samples": len(clip.samples), "sha256": clip.sha256, "rms_db": clip.rms_db, "note": clip.note}
        if isinstance(out, Exception):
            entries.append((j, {**fields, "status": "encode_error", "error": f"{type(out).__name__}: {out}"}, None))
            continue
        raw = [np.asarray(out[k]) for k in layer_ids]
        with np.errstate(over="ignore"):  # a float16 overflow is reported just below
            frames = [np.ascontiguousarray(f, dtype=dtype) for f in raw]
        problem = _nonfinite_message(raw, frames, layer_ids, np.dtype(dtype), amp)
        if problem:
            entries.append((j, {**fields, "status": "nonfinite", "error": problem}, None))
            continue
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


def extract_for_predict(manifest: str | Path, model: str, out: str | Path | None = None, **options: Any) -> Path:
    """Extract a manifest of new clips for ``probes predict`` (into ``cache/predict/`` by default).

    The cache is named after the model, the manifest's stem and a hash of its location, and it is
    reused only when its identity (encoder, manifest content, settings) equals this call's;
    otherwise it is rebuilt (aside, then swapped in), never reused stale.
    """
    if out is None:
        where = hashlib.sha256(str(Path(manifest).resolve()).encode()).hexdigest()[:8]
        base = default_out(model, manifest)
        out = DEFAULT_CACHE / "predict" / f"{base.stem}.{where}{base.suffix}"
    options.setdefault("rebuild_stale", True)
    res = extract(manifest, model, out, **options)
    if res.interrupted:
        raise KeyboardInterrupt
    return res.path

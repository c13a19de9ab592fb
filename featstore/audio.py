"""Audio loading: decode, down-mix to mono, resample with soxr, validate."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(Exception):
    """A clip that cannot be used; ``code`` is the short status stored in ``items/status``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Clip:
    """A decoded clip at the target rate."""

    samples: np.ndarray  # float32, mono
    sample_rate: int
    note: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.samples, dtype=np.float32).tobytes()).hexdigest()

    @property
    def rms_db(self) -> float:
        rms = float(np.sqrt(np.mean(np.square(self.samples, dtype=np.float64)))) if len(self.samples) else 0.0
        return 20.0 * np.log10(max(rms, 1e-10))


def probe_duration(path: str | Path) -> float | None:
    """Duration in seconds from the file header (no decoding), or ``None`` when unreadable."""
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - any decoder failure means "unknown"
        return None
    return info.frames / info.samplerate if info.samplerate else None


def load_audio(
    path: str | Path,
    sample_rate: int,
    start: float | None = None,
    end: float | None = None,
) -> Clip:
    """Decode ``path`` (optionally only ``[start, end)`` seconds) as mono float32 at ``sample_rate``.

    Stereo is averaged to mono and other rates are resampled (soxr, high quality); both are noted.
    Raises :class:`AudioError` with code ``missing``, ``unreadable``, ``empty`` or ``nan``.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError("missing", f"file not found: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            channels = f.channels
            if start is not None:
                f.seek(min(f.frames, max(0, int(round(start * sr)))))
            frames = -1 if end is None else max(0, int(round(end * sr)) - int(round((start or 0) * sr)))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types
        raise AudioError("unreadable", f"cannot decode {path.name}: {exc}") from None
    notes = []
    if data.shape[0] == 0:
        raise AudioError("empty", f"{path.name} holds no samples" + (" in the segment" if start is not None else ""))
    if channels > 1:
        data = data.mean(axis=1, keepdims=True)
        notes.append(f"down-mixed from {channels} channels")
    x = data[:, 0]
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError("nan", f"{path.name} has {bad} NaN/inf samples")
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
        notes.append(f"resampled from {sr} Hz")
    return Clip(np.ascontiguousarray(x, dtype=np.float32), sample_rate, ", ".join(notes))

"""Audio loading: decode, down-mix to mono, resample with soxr, validate."""
from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
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


#: sample rates taken as audio (a header claiming 1 Hz would resample into millions of samples, one
#: claiming 800 MHz into none)
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 10_000_000


def check_file(path: str | Path) -> Path:
    """``path`` when it is a readable regular file, else :class:`AudioError` (``missing`` for no
    file or a dangling link; ``unreadable`` for a directory, a FIFO or device — which would block
    or never end —, a link loop, a name the system refuses, or no read permission)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioError("missing", ("broken symbolic link: " if os.path.islink(path) else "file not found: ") + str(path)) from None
    except OSError as exc:
        why = {errno.ELOOP: "symbolic link loop", errno.ENAMETOOLONG: "file name too long",
               errno.EACCES: "permission denied", errno.ENOTDIR: "a folder on the path is a file"}.get(exc.errno, exc.strerror)
        name = str(path) if len(str(path)) <= 200 else str(path)[:100] + "..." + str(path)[-40:]
        raise AudioError("missing" if exc.errno == errno.ENOTDIR else "unreadable", f"{name}: {why}") from None
    except ValueError as exc:  # an embedded NUL character
        raise AudioError("unreadable", f"bad file name {str(path)[:80]!r}: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError("unreadable", f"{path} is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError("unreadable", f"{path} is not a regular file (a FIFO, device or socket)")
    if not os.access(path, os.R_OK):
        raise AudioError("unreadable", f"{path}: permission denied")
    return path


def probe_duration(path: str | Path) -> float | None:
    """Duration in seconds from the file header (no decoding), or ``None`` when unreadable."""
    try:
        check_file(path)
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - any decoder failure means "unknown"
        return None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE or info.frames < 0:
        return None
    return info.frames / info.samplerate


def load_audio(
    path: str | Path,
    sample_rate: int,
    start: float | None = None,
    end: float | None = None,
) -> Clip:
    """Decode ``path`` (optionally only ``[start, end)`` seconds) as mono float32 at ``sample_rate``.

    Stereo is averaged to mono and other rates are resampled (soxr, high quality); both are noted.
    Raises :class:`AudioError` with code ``missing``, ``unreadable``, ``empty``, ``nan`` or
    ``bad_segment``, whatever the file holds: no other exception leaves this function.
    """
    path = check_file(path)
    for t in (start, end):
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t < 1e9):
            raise AudioError("bad_segment", f"segment [{start}, {end}) s is not a segment of {path.name}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            channels = f.channels
            if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
                raise AudioError("unreadable", f"{path.name}: sample rate {sr} Hz is not audio ({MIN_SAMPLE_RATE} Hz to "
                                 f"{MAX_SAMPLE_RATE // 1_000_000} MHz)")
            if start is not None:
                f.seek(min(f.frames, max(0, int(round(start * sr)))))
            frames = -1 if end is None else max(0, int(round(end * sr)) - int(round((start or 0) * sr)))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types
        raise AudioError("unreadable", f"cannot decode {path.name}: {exc}") from None
    notes = []
    if data.shape[0] == 0:
        raise AudioError("empty", f"{path.name} holds no samples" + (" in the segment" if start is not None else ""))
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError("nan", f"{path.name} has {bad} NaN/inf samples")
    if channels > 1:
        data = data.mean(axis=1, keepdims=True)
        notes.append(f"down-mixed from {channels} channels")
    x = data[:, 0]
    if sr != sample_rate:
        try:
            x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a huge clip
            raise AudioError("unreadable", f"cannot resample {path.name} from {sr} Hz: {exc}") from None
        notes.append(f"resampled from {sr} Hz")
        if not len(x):
            raise AudioError("empty", f"{path.name}: {data.shape[0]} samples at {sr} Hz are none at {sample_rate} Hz")
    return Clip(np.ascontiguousarray(x, dtype=np.float32), sample_rate, ", ".join(notes))

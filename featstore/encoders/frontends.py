"""Acoustic front ends: log-Mel, MFCC (+deltas), spectral band energies and moments.

They are the baseline of the sigmatism literature, written as :class:`Encoder` 'models' whose
'layers' are feature families (widths may differ). Framing is uncentred: frame ``j`` covers samples
``[j*hop, j*hop + win)``, so ``num_frames = (n - win) // hop + 1`` (0 when ``n < win``) and frame
``j``'s centre is ``win / 2 + j * hop``. Every clip is processed on its own (deltas replicate the
clip's own edge frames), so a clip's features never depend on its batch: padding-exact, bit for bit.
Energies are floored before the log, so silence gives finite values.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from scipy.fft import dct
from threadpoolctl import ThreadpoolController
from transformers.audio_utils import mel_filter_bank, window_function

from featstore.encoders.base import Encoder

__all__ = ["FrameFrontEnd", "LogMelEncoder", "MFCCEncoder", "SpectralEncoder", "FRONTENDS", "make_frontend"]

REVISION = "frontend-v1"


class FrameFrontEnd(Encoder):
    """Shared framing and power spectrum; subclasses turn ``(T, n_fft//2+1)`` power into layers."""

    #: short description of each layer, same length as ``layer_dims``
    layer_names: list[str]

    def __init__(self, name: str, win: int, hop: int, n_fft: int | None, sample_rate: int,
                 log_floor: float) -> None:
        _check_int("win", win, 1)
        _check_int("hop", hop, 1)
        _check_int("sample_rate", sample_rate, 1)
        n_fft = int(2 ** int(np.ceil(np.log2(win)))) if n_fft is None else n_fft
        _check_int("n_fft", n_fft, win, f"n_fft must be an integer >= win ({win}), got {n_fft!r}")
        if not (isinstance(log_floor, (int, float)) and log_floor > 0):
            raise ValueError(f"log_floor must be a positive number, got {log_floor!r}")
        self.name = name
        self.revision = REVISION
        self.win, self.hop, self.n_fft = int(win), int(hop), int(n_fft)
        self.sample_rate = int(sample_rate)
        self.log_floor = float(log_floor)
        self.frame_stride_samples = self.hop
        self.receptive_field_samples = self.win
        self.first_frame_center_samples = self.win / 2
        self.padding_exact = True
        self.extra_attrs = {}
        self._window = window_function(self.win, "hann", periodic=True)
        #: centre frequency of each FFT bin, Hz
        self.freqs = np.fft.rfftfreq(self.n_fft, 1.0 / self.sample_rate)

    def num_frames(self, num_samples: int) -> int:
        n = int(num_samples)
        if n < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        return 0 if n < self.win else (n - self.win) // self.hop + 1

    def power_spectrum(self, clip: np.ndarray) -> np.ndarray:
        """Hann-windowed power spectrum of each frame, ``(num_frames, n_fft // 2 + 1)`` float64."""
        x = np.asarray(clip, dtype=np.float64)
        t = self.num_frames(len(x))
        if t == 0:
            return np.zeros((0, self.n_fft // 2 + 1))
        frames = np.lib.stride_tricks.sliding_window_view(x, self.win)[:: self.hop][:t]
        spec = np.fft.rfft(frames * self._window, n=self.n_fft, axis=-1)
        return spec.real ** 2 + spec.imag ** 2

    def encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Per clip, one float32 ``(num_frames, layer_dims[k])`` array per layer.

        A clip shorter than ``win`` samples gives zero-frame arrays. Each clip is computed alone.
        """
        out = []
        # small matrix products: BLAS threads only add overhead (and stall badly on a busy machine)
        with _blas_controller().limit(limits=1, user_api="blas"):
            for i, clip in enumerate(clips):
                out.append(self._encode_one(i, clip))
        return out

    #: a front end takes no attention mask
    padded_attention_mask = False

    def padded_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                        keep_padding: bool = False) -> list[list[np.ndarray]]:
        """The padded recipe (``featstore extract --emulate-padding``): each clip cut or zero-padded
        to ``pad_seconds``, framed as usual, then its true frames cut out (those inside the clip as
        cut), or with ``keep_padding`` every frame of the padded signal. Frames are local, so the true
        frames equal an exact run's except where a layer looks across frames (MFCC deltas near the
        clip's end see padding frames instead of replicated edges)."""
        n_pad = int(round(float(pad_seconds) * self.sample_rate))
        if self.num_frames(n_pad) == 0:
            raise ValueError(f"--emulate-padding {pad_seconds:g} s is shorter than one frame of {self.name} "
                             f"({self.win / self.sample_rate:g} s)")
        cut = [np.asarray(c)[:n_pad] for c in clips]
        out = self.encode([np.pad(c, (0, n_pad - len(c))) for c in cut])
        if keep_padding:
            return out
        return [[np.ascontiguousarray(a[: self.num_frames(len(c))]) for a in o] for o, c in zip(out, cut)]

    def _encode_one(self, i: int, clip: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(clip)
        if x.ndim != 1:
            raise ValueError(f"clip {i}: expected a 1-D mono signal, got shape {x.shape}")
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError(f"clip {i}: contains NaN or inf samples")
        return [np.ascontiguousarray(a, dtype=np.float32) for a in self._layers(self.power_spectrum(x))]

    def _layers(self, power: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _log(self, energy: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(energy, self.log_floor))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


class LogMelEncoder(FrameFrontEnd):
    """One layer: natural-log Mel filterbank energies, ``(T, n_mels)``.

    HTK-scale triangular filters (``transformers.audio_utils.mel_filter_bank``) between ``fmin`` and
    ``fmax`` (``None`` = Nyquist) on the power spectrum of Hann-windowed frames.
    """

    def __init__(self, n_mels: int = 64, win: int = 400, hop: int = 160, n_fft: int | None = None,
                 fmin: float = 0.0, fmax: float | None = 8000.0, sample_rate: int = 16000,
                 log_floor: float = 1e-10) -> None:
        super().__init__("logmel", win, hop, n_fft, sample_rate, log_floor)
        _check_int("n_mels", n_mels, 1)
        fmax = _check_band(fmin, fmax, self.sample_rate)
        self.n_mels = int(n_mels)
        self.fmin, self.fmax = float(fmin), fmax
        self.mel_fb = _mel_bank(self.n_fft, self.n_mels, self.fmin, self.fmax, self.sample_rate)
        self.layer_dims = [self.n_mels]
        self.layer_names = ["logmel"]
        self.config = {"n_mels": self.n_mels, "win": self.win, "hop": self.hop, "n_fft": self.n_fft,
                       "fmin": self.fmin, "fmax": self.fmax, "sample_rate": self.sample_rate,
                       "log_floor": self.log_floor}

    def _layers(self, power: np.ndarray) -> list[np.ndarray]:
        return [self._log(power @ self.mel_fb)]


class MFCCEncoder(FrameFrontEnd):
    """MFCCs: DCT-II (orthonormal) of ``n_mels`` log-Mel energies, first ``n_mfcc`` coefficients.

    Layers: 0 = MFCC ``(T, n_mfcc)``; with ``deltas=True`` also 1 = MFCC + delta + delta-delta
    ``(T, 3 * n_mfcc)``. Deltas are the usual regression over ``±delta_width`` frames of the clip's
    own frames, edges replicated.
    """

    def __init__(self, n_mfcc: int = 20, deltas: bool = True, n_mels: int = 40, win: int = 400,
                 hop: int = 160, n_fft: int | None = None, fmin: float = 0.0, fmax: float | None = 8000.0,
                 delta_width: int = 2, sample_rate: int = 16000, log_floor: float = 1e-10) -> None:
        super().__init__("mfcc", win, hop, n_fft, sample_rate, log_floor)
        _check_int("n_mels", n_mels, 1)
        _check_int("n_mfcc", n_mfcc, 1, f"n_mfcc must be an integer in [1, n_mels={n_mels}], got {n_mfcc!r}")
        if n_mfcc > n_mels:
            raise ValueError(f"n_mfcc must be an integer in [1, n_mels={n_mels}], got {n_mfcc!r}")
        _check_int("delta_width", delta_width, 1)
        if not isinstance(deltas, (bool, np.bool_)):
            raise ValueError(f"deltas must be True or False, got {deltas!r}")
        fmax = _check_band(fmin, fmax, self.sample_rate)
        self.n_mfcc, self.n_mels, self.deltas, self.delta_width = int(n_mfcc), int(n_mels), bool(deltas), int(delta_width)
        self.fmin, self.fmax = float(fmin), fmax
        self.mel_fb = _mel_bank(self.n_fft, self.n_mels, self.fmin, self.fmax, self.sample_rate)
        self.layer_dims = [self.n_mfcc, 3 * self.n_mfcc] if self.deltas else [self.n_mfcc]
        self.layer_names = ["mfcc", "mfcc+d+dd"] if self.deltas else ["mfcc"]
        self.config = {"n_mfcc": self.n_mfcc, "deltas": self.deltas, "n_mels": self.n_mels, "win": self.win,
                       "hop": self.hop, "n_fft": self.n_fft, "fmin": self.fmin, "fmax": self.fmax,
                       "delta_width": self.delta_width, "sample_rate": self.sample_rate,
                       "log_floor": self.log_floor}

    def _layers(self, power: np.ndarray) -> list[np.ndarray]:
        mfcc = dct(self._log(power @ self.mel_fb), type=2, norm="ortho", axis=-1)[:, : self.n_mfcc]
        if not self.deltas:
            return [mfcc]
        d1 = delta(mfcc, self.delta_width)
        return [mfcc, np.concatenate([mfcc, d1, delta(d1, self.delta_width)], axis=1)]


class SpectralEncoder(FrameFrontEnd):
    """Spectral band energies and moments, the classic fricative descriptors.

    Layer 0: natural-log energies of ``n_bands`` bands between ``fmin`` and ``fmax`` (``None`` =
    Nyquist), ``band_scale="linear"`` (rectangular, equal width) or ``"mel"`` (triangular).
    Layer 1, ``(T, 6)``, computed on the power spectrum between ``moment_fmin`` and ``fmax`` taken as
    a distribution over frequency: centroid (kHz), spread (standard deviation, kHz), skewness,
    kurtosis (not excess: 3 for a Gaussian), slope (least-squares slope of the dB spectrum, dB/kHz)
    and peak frequency (kHz).
    """

    MOMENTS = ("centroid_khz", "spread_khz", "skewness", "kurtosis", "slope_db_per_khz", "peak_khz")

    def __init__(self, n_bands: int = 16, band_scale: str = "linear", win: int = 400, hop: int = 160,
                 n_fft: int | None = None, fmin: float = 0.0, fmax: float | None = None,
                 moment_fmin: float = 0.0, sample_rate: int = 16000, log_floor: float = 1e-10) -> None:
        super().__init__("spectral", win, hop, n_fft, sample_rate, log_floor)
        _check_int("n_bands", n_bands, 1)
        if band_scale not in ("linear", "mel"):
            raise ValueError(f"band_scale must be 'linear' or 'mel', got {band_scale!r}")
        fmax = _check_band(fmin, fmax, self.sample_rate)
        if not (isinstance(moment_fmin, (int, float)) and 0 <= moment_fmin < fmax):
            raise ValueError(f"moment_fmin must be a number in [0, fmax={fmax}), got {moment_fmin!r}")
        self.n_bands, self.band_scale = int(n_bands), band_scale
        self.fmin, self.fmax, self.moment_fmin = float(fmin), fmax, float(moment_fmin)
        if band_scale == "mel":
            self.band_fb = _mel_bank(self.n_fft, self.n_bands, self.fmin, self.fmax, self.sample_rate)
        else:
            edges = np.linspace(self.fmin, self.fmax, self.n_bands + 1)
            f = self.freqs
            fb = (f[:, None] >= edges[None, :-1]) & (f[:, None] < edges[None, 1:])
            fb[:, -1] |= f == edges[-1]  # the top edge (e.g. Nyquist) belongs to the last band
            if not fb.any(axis=0).all():
                raise ValueError(f"n_bands={n_bands} is too many for n_fft={self.n_fft} between {fmin} and "
                                 f"{fmax} Hz: some bands hold no FFT bin")
            self.band_fb = fb.astype(np.float64)
        sel = (self.freqs >= self.moment_fmin) & (self.freqs <= self.fmax)
        self._msel = np.flatnonzero(sel)
        fk = self.freqs[self._msel] / 1000.0
        self._fk = fk
        self._fk_centred = fk - fk.mean()
        self._fk_ss = float(np.sum(self._fk_centred ** 2)) or 1.0
        self.layer_dims = [self.n_bands, len(self.MOMENTS)]
        self.layer_names = ["band_log_energy", "moments:" + ",".join(self.MOMENTS)]
        self.config = {"n_bands": self.n_bands, "band_scale": self.band_scale, "win": self.win, "hop": self.hop,
                       "n_fft": self.n_fft, "fmin": self.fmin, "fmax": self.fmax, "moment_fmin": self.moment_fmin,
                       "sample_rate": self.sample_rate, "log_floor": self.log_floor}

    def _layers(self, power: np.ndarray) -> list[np.ndarray]:
        bands = self._log(power @ self.band_fb)
        p = power[:, self._msel] + self.log_floor  # the floor makes silence a flat (finite) spectrum
        w = p / p.sum(axis=1, keepdims=True)
        fk = self._fk
        centroid = w @ fk
        dev = fk[None, :] - centroid[:, None]
        wdev2 = w * dev * dev
        var = wdev2.sum(axis=1)
        spread = np.sqrt(var)
        safe_var = np.maximum(var, 1e-12)
        skew = (wdev2 * dev).sum(axis=1) / (safe_var * np.sqrt(safe_var))
        kurt = (wdev2 * dev * dev).sum(axis=1) / (safe_var * safe_var)
        db = 10.0 * np.log10(p)
        slope = (db @ self._fk_centred) / self._fk_ss
        peak = fk[np.argmax(p, axis=1)]
        return [bands, np.stack([centroid, spread, skew, kurt, slope, peak], axis=1)]


def delta(feats: np.ndarray, width: int = 2) -> np.ndarray:
    """Regression deltas over ``±width`` frames along axis 0, edges replicated (clip-local)."""
    t = feats.shape[0]
    if t == 0:
        return feats.copy()
    padded = np.pad(feats, ((width, width), (0, 0)), mode="edge")
    num = sum(n * (padded[width + n: width + n + t] - padded[width - n: width - n + t]) for n in range(1, width + 1))
    return num / (2.0 * sum(n * n for n in range(1, width + 1)))


#: front-end name -> class
FRONTENDS: dict[str, type[FrameFrontEnd]] = {
    "logmel": LogMelEncoder,
    "mfcc": MFCCEncoder,
    "spectral": SpectralEncoder,
}


def make_frontend(name: str, **options: Any) -> FrameFrontEnd:
    """Build the front end ``name`` ("logmel", "mfcc", "spectral") with its keyword ``options``.

    ``make_frontend(enc.name, **enc.config)`` rebuilds an identical encoder. Unknown names or
    options raise :class:`ValueError` listing what is accepted.
    """
    if name not in FRONTENDS:
        raise ValueError(f"unknown front end {name!r}; choose one of: {', '.join(FRONTENDS)}")
    cls = FRONTENDS[name]
    accepted = _options(cls.__init__)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) for front end {name!r}: {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**options)


def _options(init: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(init).parameters if p != "self"]


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # scanning the loaded libraries once (~5 ms) instead of per call


def _check_int(what: str, value: Any, minimum: int, message: str | None = None) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(message or f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_band(fmin: Any, fmax: Any, sample_rate: int) -> float:
    """Validate ``0 <= fmin < fmax <= sample_rate / 2``; returns fmax (``None`` -> Nyquist)."""
    nyquist = sample_rate / 2
    fmax = nyquist if fmax is None else fmax
    ok = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in (fmin, fmax))
    if not ok or not (0 <= fmin < fmax <= nyquist):
        raise ValueError(f"need 0 <= fmin < fmax <= Nyquist ({nyquist:g} Hz), got fmin={fmin!r}, fmax={fmax!r}")
    return float(fmax)


def _mel_bank(n_fft: int, n_filters: int, fmin: float, fmax: float, sample_rate: int) -> np.ndarray:
    """``(n_fft // 2 + 1, n_filters)`` HTK triangular filters; refuses filters that hold no FFT bin."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = mel_filter_bank(n_fft // 2 + 1, n_filters, fmin, fmax, sample_rate, norm=None, mel_scale="htk")
    empty = np.flatnonzero(fb.max(axis=0) <= 0)
    if empty.size:
        raise ValueError(f"{n_filters} Mel filters between {fmin:g} and {fmax:g} Hz are too narrow for n_fft={n_fft}: "
                         f"filter(s) {empty.tolist()} hold no FFT bin; use fewer filters or a larger n_fft")
    return fb

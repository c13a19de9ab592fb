"""A project-made synthetic sibilant set shaped like clinical sigmatism data.

``make_sibilant_set`` writes short WAV clips of /s/-like shaped noise and a manifest. Three classes,
imbalanced as in the motivating data (Normal 25 %, Lateral 55 %, Interdental 20 % of speakers),
one label per speaker (a child), clip durations of median ~0.15 s in [0.08, 0.25] s:

- Normal /s/: strong, a narrow-ish spectral peak around 5-7 kHz, little low-frequency energy.
- Lateral: a lower, broader peak (~2.5-4 kHz), low-frequency energy, a slushy amplitude flutter.
- Interdental (/θ/-like): weak, flat, diffuse spectrum without a clear peak.

Disordered speakers have a severity in [0.3, 1] that moves them from the Normal prototype towards
their class's, and every speaker has their own vocal-tract scale (shifts all peaks), spectral tilt,
recording channel colour, loudness and background noise, so classes overlap, speaker identity is in
the audio, and speaker-grouped cross-validation matters. With ``context=True`` each sibilant sits
inside a 0.4-0.8 s 'word' between two vowel-like voiced segments (glottal pulses through formant
resonators) and the manifest gives the sibilant's ``start``/``end`` in seconds.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from scipy.fft import next_fast_len
from scipy.signal import lfilter

__all__ = ["CLASSES", "CLASS_PROBS", "DURATION_RANGE", "MEDIAN_DURATION", "CONTEXT_RANGE",
           "MANIFEST_NAME", "class_names", "make_sibilant_set"]

#: class names, in the order used throughout
CLASSES: tuple[str, ...] = ("Normal", "Lateral", "Interdental")
#: share of speakers (hence of clips) per class
CLASS_PROBS: tuple[float, ...] = (0.25, 0.55, 0.20)
#: sibilant duration range and median, seconds
DURATION_RANGE: tuple[float, float] = (0.08, 0.25)
MEDIAN_DURATION = 0.15
#: whole-word duration range with ``context=True``, seconds
CONTEXT_RANGE: tuple[float, float] = (0.4, 0.8)
MANIFEST_NAME = "manifest.csv"

# Class prototypes of the sibilant's power spectrum (dB, Hz, octaves) and overall level (dB).
_PROTO = {
    #              peak Hz  bw oct  peak dB  low dB  flat dB  level dB  flutter
    "Normal":      (6000.0, 0.30,   0.0,    -36.0,  -30.0,    0.0,      0.00),
    "Lateral":     (3200.0, 0.65,  -2.0,    -12.0,  -20.0,   -3.0,      0.35),
    "Interdental": (4500.0, 1.60,  -24.0,   -18.0,    0.0,  -11.0,      0.00),
}
#: other consonants of a context word: peak Hz, bw oct, peak/low/flat dB, level dB (vs a normal /s/),
#: duration range s
_DISTRACTORS = (
    (3000.0, 0.45, 0.0, -20.0, -22.0, 0.0, (0.06, 0.14)),    # /ʃ/: close to a lateral /s/
    (4000.0, 2.00, -30.0, -25.0, 0.0, -12.0, (0.06, 0.12)),  # /f/: flat and weak
    (1500.0, 0.60, 0.0, -15.0, -25.0, -6.0, (0.06, 0.12)),   # /x/: low peak
    (4000.0, 1.20, 0.0, -20.0, -10.0, -2.0, (0.02, 0.04)),   # /t/ burst
)
_VOWELS = {  # adult-ish F1, F2, F3 (Hz); scaled per speaker (children: ~x1.2-1.35)
    "a": (730.0, 1090.0, 2440.0), "i": (270.0, 2290.0, 3010.0), "u": (300.0, 870.0, 2240.0),
    "e": (530.0, 1840.0, 2480.0), "o": (570.0, 840.0, 2410.0),
}


def class_names() -> list[str]:
    """The class labels, ``["Normal", "Lateral", "Interdental"]``."""
    return list(CLASSES)


def make_sibilant_set(out_dir: str | Path, n_speakers: int = 40, clips_per_speaker: int = 25, seed: int = 0,
                      context: bool = False, sample_rate: int = 16000) -> Path:
    """Write ``n_speakers * clips_per_speaker`` WAV clips and ``out_dir/manifest.csv``; return its path.

    Manifest columns: ``id,path,label,speaker,sex,age`` (+ ``start,end`` in seconds with
    ``context=True``); ``path`` is relative to ``out_dir`` (``wav/<id>.wav``, 16-bit PCM).
    Speakers get labels in the proportions of :data:`CLASS_PROBS` (largest remainder, at least one
    speaker per class). The same arguments always give byte-identical files.
    """
    if isinstance(n_speakers, bool) or not isinstance(n_speakers, (int, np.integer)) or n_speakers < len(CLASSES):
        raise ValueError(f"n_speakers must be an integer >= {len(CLASSES)} (one per class), got {n_speakers!r}")
    if isinstance(clips_per_speaker, bool) or not isinstance(clips_per_speaker, (int, np.integer)) \
            or clips_per_speaker < 1:
        raise ValueError(f"clips_per_speaker must be an integer >= 1, got {clips_per_speaker!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 16000:
        raise ValueError(f"sample_rate must be an integer >= 16000 (the peaks reach 8 kHz), got {sample_rate!r}")
    out_dir = Path(out_dir)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(int(seed))
    label_seq, *speaker_seqs = root.spawn(n_speakers + 1)
    labels = _speaker_labels(int(n_speakers), np.random.default_rng(label_seq))
    columns = ["id", "path", "label", "speaker", "sex", "age"] + (["start", "end"] if context else [])
    rows = []
    for s in range(n_speakers):
        rng = np.random.default_rng(speaker_seqs[s])
        spk = _Speaker(labels[s], rng, sample_rate)
        for j in range(clips_per_speaker):
            item_id = f"spk{s:03d}_{j:03d}"
            sib = spk.sibilant(rng)
            if context:
                audio, start, end = spk.word(sib, rng)
            else:
                audio, start, end = sib, 0, len(sib)
            audio = spk.add_noise(audio, rng)
            peak = np.max(np.abs(audio))
            if peak > 0.98:
                audio = audio * (0.98 / peak)
            rel = f"wav/{item_id}.wav"
            buf = io.BytesIO()  # via memory: soundfile's close() syncs each file to disk (slow)
            sf.write(buf, audio, sample_rate, subtype="PCM_16", format="WAV")
            (out_dir / rel).write_bytes(buf.getvalue())
            row = {"id": item_id, "path": rel, "label": spk.label, "speaker": f"spk{s:03d}", "sex": spk.sex,
                   "age": str(spk.age)}
            if context:
                row["start"], row["end"] = f"{start / sample_rate:.7f}", f"{end / sample_rate:.7f}"
            rows.append(row)
    manifest = out_dir / MANIFEST_NAME
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _speaker_labels(n: int, rng: np.random.Generator) -> list[str]:
    """Largest-remainder class counts (>= 1 each), in a random speaker order."""
    quota = np.asarray(CLASS_PROBS) * n
    counts = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - counts), kind="stable")[: n - counts.sum()]:
        counts[c] += 1
    for c in range(len(CLASSES)):
        while counts[c] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[c] += 1
    labels = np.repeat(np.arange(len(CLASSES)), counts)
    return [CLASSES[i] for i in rng.permutation(labels)]


class _Speaker:
    """One child: fixed label, anatomy, articulation habit, channel and noise."""

    def __init__(self, label: str, rng: np.random.Generator, sr: int) -> None:
        self.label, self.sr = label, sr
        self.sex = "F" if rng.random() < 0.5 else "M"
        self.age = int(rng.integers(4, 10))
        # younger children: shorter vocal tract, higher resonances
        self.vt_scale = float(np.exp(0.025 * (7 - self.age) + rng.normal(0, 0.06)))
        severity = 0.0 if label == "Normal" else float(rng.uniform(0.3, 1.0))
        norm, proto = np.array(_PROTO["Normal"]), np.array(_PROTO[label])
        mix = (1 - severity) * norm + severity * proto
        mix[0] = np.exp((1 - severity) * np.log(norm[0]) + severity * np.log(proto[0]))  # peak: log-frequency
        self.peak_hz = mix[0] * self.vt_scale * float(np.exp(rng.normal(0, 0.08)))
        self.bw_oct = mix[1] * float(np.exp(rng.normal(0, 0.15)))
        self.peak_db, self.low_db, self.flat_db = mix[2:5] + rng.normal(0, 3.0, 3)
        self.level_db = -24.0 + mix[5] + rng.normal(0, 3.5)
        self.flutter = mix[6]
        self.tilt_db_oct = rng.normal(0, 2.0)  # channel / voice tilt
        self.eq = rng.normal(0, 2.0, 4), rng.uniform(0, 2 * np.pi, 4)  # smooth channel colour
        self.noise_db = rng.uniform(-66, -44)
        self.noise_tilt = rng.uniform(-6, 0)  # dB/octave: pink-ish to brown-ish
        self.f0 = (rng.uniform(230, 320) if self.sex == "F" else rng.uniform(210, 300)) * (1 + 0.03 * (7 - self.age))
        self.vowel_db = -15.0 + rng.normal(0, 2.5)
        self.breath_db = rng.uniform(-32, -18)

    def _channel_db(self, f: np.ndarray) -> np.ndarray:
        oct_ = np.log2(np.maximum(f, 50.0) / 1000.0)
        amp, phase = self.eq
        k = np.arange(1, 5)[:, None]
        return self.tilt_db_oct * oct_ + (amp[:, None] * np.cos(k * oct_[None, :] * 0.9 + phase[:, None])).sum(0)

    def _shaped_noise(self, n: int, power_db_at: Callable[[np.ndarray], np.ndarray],
                      rng: np.random.Generator) -> np.ndarray:
        """``n`` samples of Gaussian noise whose power spectrum (dB) is ``power_db_at(freqs_hz)``."""
        m = next_fast_len(n, real=True)
        f = np.fft.rfftfreq(m, 1 / self.sr)
        spec = np.fft.rfft(rng.standard_normal(m))
        return np.fft.irfft(spec * 10 ** (power_db_at(f) / 20), n=m)[:n]

    def _fricative(self, n: int, fc: float, bw: float, peak_db: float, low_db: float, flat_db: float,
                   rng: np.random.Generator) -> np.ndarray:
        """Noise with a log-Gaussian peak at ``fc`` (``bw`` octaves), low-frequency and flat parts, the
        speaker's channel, and raised-cosine onset/offset ramps (unit RMS)."""
        def power_db_at(f: np.ndarray) -> np.ndarray:
            fs = np.maximum(f, 1.0)
            power = (10 ** (peak_db / 10) * np.exp(-0.5 * (np.log2(fs / fc) / bw) ** 2)
                     + 10 ** (low_db / 10) / (1 + (fs / 1500) ** 4)
                     + 10 ** (flat_db / 10) / (1 + (fs / 7600) ** 12))
            return 10 * np.log10(power) + self._channel_db(f) - 40 * (f < 80)  # no DC / rumble
        x = self._shaped_noise(n, power_db_at, rng)
        ramp = max(1, int(rng.uniform(0.012, 0.03) * self.sr)), max(1, int(rng.uniform(0.012, 0.03) * self.sr))
        return _set_rms(x * _ramps(n, *ramp), 0.0)

    def sibilant(self, rng: np.random.Generator) -> np.ndarray:
        """One sibilant token: the speaker's articulation with per-token jitter, at their level."""
        dur = float(np.clip(MEDIAN_DURATION * np.exp(rng.normal(0, 0.28)), *DURATION_RANGE))
        n = int(round(dur * self.sr))
        fc = self.peak_hz * np.exp(rng.normal(0, 0.07))
        bw = self.bw_oct * np.exp(rng.normal(0, 0.12))
        pk, lo, fl = np.array([self.peak_db, self.low_db, self.flat_db]) + rng.normal(0, 2.0, 3)
        x = self._fricative(n, fc, bw, pk, lo, fl, rng)
        if self.flutter > 0:  # 'slushy': irregular amplitude flutter
            t = np.arange(n) / self.sr
            x *= 1 + self.flutter * np.sin(2 * np.pi * rng.uniform(25, 60) * t + rng.uniform(0, 2 * np.pi))
        return _set_rms(x, self.level_db + rng.normal(0, 1.5))

    def _distractor(self, rng: np.random.Generator) -> np.ndarray:
        """Another consonant of the word (/ʃ/, /f/, /x/ or a /t/ burst), the same for every class."""
        kind = _DISTRACTORS[int(rng.integers(len(_DISTRACTORS)))]
        fc, bw, pk, lo, fl, level, (dmin, dmax) = kind
        n = int(rng.uniform(dmin, dmax) * self.sr)
        x = self._fricative(n, fc * self.vt_scale * np.exp(rng.normal(0, 0.08)), bw, pk, lo, fl, rng)
        return _set_rms(x, level + self.level_db + 24.0 + rng.normal(0, 2.0))

    def _vowel(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """A vowel-like voiced segment: glottal pulses (jittered f0) through 3 formant resonators."""
        f0 = self.f0 * np.exp(rng.normal(0, 0.05))
        t = np.arange(n) / self.sr
        inst_f0 = f0 * (1 + 0.06 * (0.5 - t / max(t[-1], 1e-9)) * rng.uniform(0.5, 1.5))  # declination
        phase = np.cumsum(inst_f0) / self.sr
        src = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal cycle
        src = lfilter([1.0], [1.0, -0.97], lfilter([1.0], [1.0, -0.9], src))  # -12 dB/oct glottal roll-off
        src += 10 ** (self.breath_db / 20) * rng.standard_normal(n) * np.std(src)  # breathiness
        formants = np.array(_VOWELS[rng.choice(list(_VOWELS))]) * 1.25 * self.vt_scale * np.exp(rng.normal(0, 0.04, 3))
        y = np.zeros(n)
        for k, (fk, bk) in enumerate(zip(formants, (90.0, 120.0, 170.0))):
            fk = min(fk, 0.45 * self.sr)
            r = np.exp(-np.pi * bk / self.sr)
            a = [1.0, -2 * r * np.cos(2 * np.pi * fk / self.sr), r * r]
            y += lfilter([1 - r], a, src) * (0.5 ** k)
        y -= np.mean(y)
        y *= _ramps(n, int(0.02 * self.sr), int(0.02 * self.sr))
        return _set_rms(y, self.vowel_db + rng.normal(0, 2.0))

    def word(self, sib: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        """[consonant] vowel sibilant vowel [consonant], 0.4-0.8 s; returns (audio, start, end) in samples."""
        total = int(round(rng.uniform(*CONTEXT_RANGE) * self.sr))
        pre = [self._distractor(rng)] if rng.random() < 0.6 else []
        post = [self._distractor(rng)] if rng.random() < 0.6 else []
        rest = total - len(sib) - sum(len(d) for d in pre + post)
        rest = max(rest, int(0.12 * self.sr))
        before = int(round(rest * rng.uniform(0.3, 0.7)))
        parts = pre + [self._vowel(before, rng), sib, self._vowel(rest - before, rng)] + post
        start = sum(len(p) for p in parts[: len(pre) + 1])
        return np.concatenate(parts), start, start + len(sib)

    def add_noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Speaker's background noise (own level and colour) over the whole clip."""
        def power_db_at(f: np.ndarray) -> np.ndarray:
            return self.noise_tilt * np.log2(np.maximum(f, 100.0) / 1000.0)
        return x + _set_rms(self._shaped_noise(len(x), power_db_at, rng), self.noise_db)


def _ramps(n: int, rise: int, fall: int) -> np.ndarray:
    env = np.ones(n)
    rise, fall = min(rise, n // 2), min(fall, n // 2)
    if rise:
        env[:rise] = 0.5 - 0.5 * np.cos(np.pi * np.arange(rise) / rise)
    if fall:
        env[n - fall:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(fall) + 1) / fall)
    return env


def _set_rms(x: np.ndarray, db: float) -> np.ndarray:
    rms = np.sqrt(np.mean(x ** 2))
    return x * (10 ** (db / 20) / rms) if rms > 0 else x

"""Phonetic sanity check of a Whisper encoder on a project-made speech set.

Synthesises words that differ only in their initial fricative (/s/, /θ/, /f/: "sin/thin/fin",
"sought/thought/fought", ...) with ``espeak-ng`` voices (accent x voice variant x pitch x speed = one
synthetic speaker), adds white noise (5 dB SNR by default: clean synthetic speech makes every layer
score ~1.0), writes 16-kHz WAVs and ``manifest.csv`` (path,label,speaker,word), extracts
every encoder layer into a feature store (``featstore.extract``), mean-pools each clip's frames per
layer, and scores a logistic-regression probe with speaker-grouped 5-fold CV (balanced accuracy),
next to the same probe on shuffled labels. Prints a markdown table.

Needs ``espeak-ng`` (Debian: ``apt-get install -y espeak-ng``) and a Whisper model directory
(default ``../shared/models/whisper-tiny.en`` beside the project). Not part of the test suite.

    python bench/whisper_phonetic.py [--model DIR] [--context-seconds S] [--out cache/whisper_phonetic]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT.parent / "shared/models/whisper-tiny.en"
SAMPLE_RATE = 16000

#: minimal triples: the same rhyme after /s/, /θ/ and /f/ (/θ/-/f/ is a hard contrast)
TRIPLES = [
    ("sin", "thin", "fin"),
    ("sought", "thought", "fought"),
    ("sigh", "thigh", "fie"),
    ("sank", "thank", "fank"),
    ("sick", "thick", "fick"),
    ("sum", "thumb", "fum"),
]
LABELS = ("s", "th", "f")
#: espeak-ng accents and voice variants; a speaker = accent + variant + pitch + speed
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "f1", "m3", "f2", "m4", "f3", "m7", "f4", "m2", "f5", "m5", "m6", "klatt", "klatt2"]


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speakers(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic speakers: accent, voice variant, pitch (0-99) and speed (words/min)."""
    rng = np.random.default_rng(seed)
    return [
        {"speaker": f"spk{i:02d}", "voice": f"{ACCENTS[i % len(ACCENTS)]}+{VARIANTS[i % len(VARIANTS)]}",
         "pitch": int(rng.integers(25, 75)), "speed": int(rng.integers(130, 190))}
        for i in range(n)
    ]


def synth(text: str, voice: str, pitch: int = 50, speed: int = 160, trim_db: float = 35.0) -> np.ndarray:
    """espeak-ng speech at 16 kHz, float32, leading/trailing silence trimmed (``trim_db`` below peak)."""
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "x.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(wav), text],
                       check=True, capture_output=True)
        x, sr = sf.read(wav, dtype="float32")
    if x.ndim > 1:
        x = x.mean(1)
    x = soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32)
    hop = 160
    env = np.sqrt(np.convolve(x**2, np.ones(hop) / hop, mode="same") + 1e-12)
    on = np.flatnonzero(20 * np.log10(env / env.max()) > -trim_db)
    return x[max(0, on[0] - hop) : on[-1] + hop] if len(on) else x


def add_noise(x: np.ndarray, snr_db: float | None, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``snr_db`` relative to the clip's mean power (``None``: unchanged)."""
    if snr_db is None:
        return x
    noise = rng.standard_normal(len(x)) * np.sqrt(np.mean(x.astype(np.float64) ** 2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def make_set(out: Path, n_speakers: int, n_triples: int, snr_db: float | None = 5.0, seed: int = 0) -> Path:
    """Write ``out/wavs/*.wav`` and ``out/manifest.csv``; returns the manifest path."""
    import soundfile as sf

    rng = np.random.default_rng(seed + 1)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    rows = []
    for spk in speakers(n_speakers, seed):
        for triple in TRIPLES[:n_triples]:
            for label, word in zip(LABELS, triple):
                rel = f"wavs/{spk['speaker']}_{word}.wav"
                x = add_noise(synth(word, spk["voice"], spk["pitch"], spk["speed"]), snr_db, rng)
                sf.write(out / rel, x, SAMPLE_RATE)
                rows.append({"path": rel, "label": label, "speaker": spk["speaker"], "word": word})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "speaker", "word"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def pooled_layers(manifest: Path, encoder, out_h5: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Extract into a store and mean-pool each item's frames per layer: ``(X per layer, labels, groups)``."""
    import featstore
    from featstore.extract import extract

    extract(manifest, encoder, out_h5, overwrite=True, progress=False, audit_clips=0)
    with featstore.open(out_h5) as store:
        ok = store.column("status") == "ok"
        rows = np.flatnonzero(ok)
        xs = []
        for k in range(store.num_layers):
            xs.append(np.stack([f.mean(0) for _, f in store.iter_item_frames(k, rows)]))
        return xs, store.column("label")[rows].astype(str), store.column("group")[rows].astype(str)


def probe_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> np.ndarray:
    """Per-fold balanced accuracy of standardised logistic regression, speaker-grouped k-fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import warnings

    scores = []
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    for tr, te in GroupKFold(n_splits=folds).split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(x[tr], y[tr])
        scores.append(balanced_accuracy_score(y[te], clf.predict(x[te])))
    return np.asarray(scores)


def shuffle_within(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted inside each speaker: breaks the audio-label link, keeps each speaker's classes."""
    out = y.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = y[rng.permutation(idx)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--context-seconds", type=float, default=None, help="shortened window (default: full 30 s)")
    ap.add_argument("--out", default=str(ROOT / "cache/whisper_phonetic"))
    ap.add_argument("--speakers", type=int, default=15)
    ap.add_argument("--triples", type=int, default=4)
    ap.add_argument("--snr-db", type=float, default=5.0, help="white-noise SNR in dB (default 5)")
    ap.add_argument("--clean", action="store_true", help="no added noise")
    ap.add_argument("--shuffles", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not have_espeak():
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    if not Path(args.model).is_dir():
        sys.exit(f"no model directory at {args.model}")
    from featstore.encoders.registry import load_encoder

    out = Path(args.out)
    t0 = time.perf_counter()
    snr = None if args.clean else args.snr_db
    manifest = make_set(out, args.speakers, args.triples, snr, args.seed)
    t_synth = time.perf_counter() - t0
    encoder = load_encoder(args.model, device="auto", context_seconds=args.context_seconds)
    t0 = time.perf_counter()
    xs, y, groups = pooled_layers(manifest, encoder, out / "whisper.h5")
    t_extract = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    rows = []
    for k, x in enumerate(xs):
        real = probe_scores(x, y, groups)
        shuffled = np.mean([probe_scores(x, shuffle_within(y, groups, rng), groups).mean() for _ in range(args.shuffles)])
        rows.append((k, real, shuffled))
    t_probe = time.perf_counter() - t0
    import featstore

    with featstore.open(out / "whisper.h5") as store:
        secs = store.column("num_samples").astype(float) / SAMPLE_RATE
        mode = store.attrs.get("whisper_window_mode")
    window = mode if args.context_seconds is None else f"context {args.context_seconds:g} s"
    print(f"Whisper phonetic probe: {Path(args.model).name}, window {window}; {len(y)} words "
          f"({len(set(y))} classes: /s/ /θ/ /f/ onsets, {args.triples} minimal triples), {len(set(groups))} espeak-ng "
          f"speakers, {'clean' if snr is None else f'white noise at {snr:g} dB SNR'}, word duration median {np.median(secs):.2f} s [{secs.min():.2f}, {secs.max():.2f}]; "
          f"mean-pooled clip frames, standardised logistic regression (C=0.1), speaker-grouped 5-fold CV, "
          f"balanced accuracy (chance {1 / len(LABELS):.2f}); shuffled = same probe on permuted labels "
          f"within each speaker (mean of {args.shuffles}). Synthesis {t_synth:.0f} s, extraction {t_extract:.0f} s, "
          f"probes {t_probe:.0f} s.\n")
    print("| layer | balanced accuracy (mean ± sd over folds) | shuffled control |")
    print("|---:|---:|---:|")
    for k, real, shuffled in rows:
        print(f"| {k} | {real.mean():.3f} ± {real.std():.3f} | {shuffled:.3f} |")
    means = [r[1].mean() for r in rows]
    best = int(np.argmax(means))
    diff = rows[best][1] - rows[0][1]
    print(f"\nrange over layers {min(means):.3f}-{means[best]:.3f} (best layer {best}); max shuffled "
          f"{max(r[2] for r in rows):.3f}; best layer minus layer 0 on the same folds: "
          f"{diff.mean():+.3f} (better on {int((diff > 0).sum())}/{len(diff)} folds)")


if __name__ == "__main__":
    main()

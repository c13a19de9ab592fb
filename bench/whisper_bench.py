"""Whisper context windows: per-layer deviation from the 30-s window, and speed.

For short speech clips (0.10-0.25 s cut from espeak-ng words; shaped noise bursts when espeak-ng is
absent), runs the encoder with its full 30-s window and with ``context_seconds`` S, and reports per
layer the cosine (mean over the clips' frames) and the max absolute difference of the S-window
frames vs the 30-s frames, plus throughput (clips/s, batch of all clips, best of ``--repeats``;
one torch thread by default, whose ratios hold up best on a shared machine). Prints markdown
tables. Not part of the test suite.

    python bench/whisper_bench.py [--model DIR] [--clips 16] [--contexts 1,2,5,10] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import load_average  # noqa: E402
DEFAULT_MODEL = ROOT.parent / "shared/models/whisper-tiny.en"
WORDS = ["sea", "shoe", "fish", "sun", "mass", "chef", "bath", "cats", "vase", "shell", "fast", "wish"]


def short_clips(n: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """``n`` clips of 0.10-0.25 s: a random stretch of a spoken word (espeak-ng) or a noise burst."""
    rng = np.random.default_rng(seed)
    from whisper_phonetic import have_espeak, speakers, synth

    clips = []
    if have_espeak():
        voices = speakers(max(n, 1), seed)
        for i in range(n):
            word = synth(WORDS[i % len(WORDS)], voices[i]["voice"], voices[i]["pitch"], voices[i]["speed"])
            length = min(int(rng.uniform(0.10, 0.25) * 16000), len(word))
            start = int(rng.integers(0, len(word) - length + 1))
            clips.append(word[start : start + length])
        return clips, "espeak-ng words"
    from scipy.signal import butter, lfilter

    for _ in range(n):
        length = int(rng.uniform(0.10, 0.25) * 16000)
        lo = rng.uniform(2000, 5000)
        b, a = butter(4, [lo / 8000, min(lo * 1.6, 7800) / 8000], btype="band")
        x = lfilter(b, a, rng.standard_normal(length)) * np.hanning(length)
        clips.append((0.1 * x / np.abs(x).max()).astype(np.float32))
    return clips, "band-pass noise bursts (espeak-ng not installed)"


def throughput(encoder, clips: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """Clips per wall-clock second and per CPU second (all threads), best of ``repeats``."""
    encoder.encode(clips[:1])  # warm-up
    wall = cpu = np.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        encoder.encode(clips)
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return len(clips) / wall, len(clips) / cpu


def deviation(ctx: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> tuple[list[float], list[float], list[float]]:
    """Per layer: mean cosine, min cosine and max |diff| over all clip frames."""
    mean_cos, min_cos, max_abs = [], [], []
    for k in range(len(ref[0])):
        a = np.concatenate([c[k] for c in ctx]).astype(np.float64)
        b = np.concatenate([r[k] for r in ref]).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        mean_cos.append(float(cos.mean()))
        min_cos.append(float(cos.min()))
        max_abs.append(float(np.abs(a - b).max()))
    return mean_cos, min_cos, max_abs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--contexts", default="1,2,5,10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: least sensitive to other load; 0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"no model directory at {args.model}")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from featstore.encoders.registry import load_encoder

    contexts = [float(s) for s in args.contexts.split(",")]
    clips, source = short_clips(args.clips, args.seed)
    full = load_encoder(args.model, device=args.device)
    ref = full.encode(clips)
    speed = {30.0: throughput(full, clips, max(1, args.repeats - 1))}
    results = {}
    for s in contexts:
        enc = load_encoder(args.model, device=args.device, context_seconds=s)
        results[s] = deviation(enc.encode(clips), ref)
        speed[s] = throughput(enc, clips, args.repeats)

    durations = np.array([len(c) for c in clips]) / 16000
    frames = sum(len(r[0]) for r in ref)
    print(f"Whisper context windows vs the 30-s window: {Path(args.model).name}, {len(clips)} clips of {source}, "
          f"{durations.min():.2f}-{durations.max():.2f} s (median {np.median(durations):.2f} s, {frames} frames), "
          f"{args.device}, {torch.get_num_threads()} torch thread(s), float32.\n")
    print("Per-layer deviation of the clip's frames (mean cosine / min cosine / max |diff|; layer 0 = embeddings,")
    print("last = after the final layer norm):\n")
    head = " | ".join(f"{s:g} s: cos mean / min / max abs" for s in contexts)
    print(f"| layer | {head} |")
    print("|---:|" + "---:|" * len(contexts))
    for k in range(full.num_layers):
        cells = " | ".join(f"{results[s][0][k]:.4f} / {results[s][1][k]:.3f} / {results[s][2][k]:.3g}" for s in contexts)
        print(f"| {k} | {cells} |")
    load = load_average()
    print("\nThroughput (all clips in one batch, best of repeats; the 30-s window costs the same for any clip "
          f"length; clips per CPU-second is less sensitive to other load: 1-min load average {load:.1f} "
          f"on {os.cpu_count()} cores):\n")
    print("| window | clips/s (wall) | speed-up (wall) | clips per CPU-s | speed-up (CPU) |")
    print("|---:|---:|---:|---:|---:|")
    w0, c0 = speed[30.0]
    for s in [30.0] + contexts:
        w, c = speed[s]
        print(f"| {s:g} s | {w:.2f} | {w / w0:.1f}x | {c:.2f} | {c / c0:.1f}x |")


if __name__ == "__main__":
    main()

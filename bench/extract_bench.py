"""Extraction benchmark: the common padded pipeline vs `featstore extract`, in one run.

Builds a synthetic set shaped like the motivating data (median ~0.15 s, 0.08-0.25 s) and a
base-size WavLM from ``WavLMConfig()`` (random weights: the same compute as the pretrained one),
then times

  (a) the common pipeline: feature extractor pads/truncates to 1.0 s, batches of 8, full model;
  (b) ``featstore.extract.extract`` end to end (decode, batch, encode, write HDF5),

and prints true-audio seconds per second for both, their ratio, the padded-frame fraction of each,
and the max abs difference of each to solo runs of the same clips.

    python bench/extract_bench.py --n 1000
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchutil import base_wavlm


def make_clips(out: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dur = np.clip(rng.lognormal(np.log(0.15), 0.3, size=n), 0.08, 0.25)
    rows = []
    for i, d in enumerate(dur):
        x = (0.05 * rng.normal(size=int(d * 16000))).astype(np.float32)
        sf.write(str(out / f"c{i:05d}.wav"), x, 16000, subtype="PCM_16")
        rows.append({"path": f"c{i:05d}.wav", "label": "NLI"[i % 3], "speaker": f"s{i % 40}"})
    with (out / "clips.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "speaker"])
        w.writeheader()
        w.writerows(rows)
    return out / "clips.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of clips")
    ap.add_argument("--model", default=None, help="model directory (default: a random-weight base WavLM)")
    ap.add_argument("--batch-seconds", type=float, default=60.0)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--solo-check", type=int, default=16, help="clips compared against solo runs")
    args = ap.parse_args()

    from featstore.encoders.hf_ssl import SSLEncoder
    from featstore.encoders.registry import pick_device
    from featstore.extract import extract

    tmp = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    (tmp / "wav").mkdir()
    manifest = make_clips(tmp / "wav", args.n)
    model_dir = Path(args.model) if args.model else base_wavlm(tmp / "wavlm-base")
    device = pick_device(args.device)
    enc = SSLEncoder(model_dir, device=device)
    clips = [sf.read(str(tmp / "wav" / f"c{i:05d}.wav"), dtype="float32")[0] for i in range(args.n)]
    audio_s = sum(len(c) for c in clips) / 16000
    true_frames = sum(enc.num_frames(len(c)) for c in clips)
    print(f"{args.n} clips, {audio_s:.1f} s of audio, median {np.median([len(c) for c in clips]) / 16000:.3f} s; "
          f"model {model_dir.name}, device {device}, torch threads {torch.get_num_threads()}")

    # (a) the common pipeline
    t = time.perf_counter()
    padded_out = []
    for b in range(0, args.n, 8):
        padded_out += enc.common_pipeline(clips[b : b + 8], pad_seconds=1.0)
    t_pad = time.perf_counter() - t
    pad_frames_total = int(np.ceil(args.n / 8)) * 8 * enc.num_frames(16000)
    pad_frac = 1 - true_frames / pad_frames_total

    # (b) featstore extract
    t = time.perf_counter()
    res = extract(manifest, enc, tmp / "store.h5", batch_seconds=args.batch_seconds, progress=False, audit_clips=0)
    t_ours = time.perf_counter() - t

    import featstore

    store = featstore.open(res.path)
    rng = np.random.default_rng(0)
    check = rng.choice(args.n, size=min(args.solo_check, args.n), replace=False)
    d_ours = d_pad = 0.0
    for i in check:
        solo = enc._encode([clips[i]])[0]
        for k in range(enc.num_layers):
            d_ours = max(d_ours, float(np.abs(store.frames(int(i), k) - solo[k]).max()))
            d_pad = max(d_pad, float(np.abs(padded_out[i][k] - solo[k]).max()))

    print()
    print("| pipeline | wall s | true-audio s/s | padded frames | max abs diff to solo |")
    print("|---|---:|---:|---:|---:|")
    print(f"| common: pad to 1.0 s, batch 8, full model | {t_pad:.1f} | {audio_s / t_pad:.2f} | {100 * pad_frac:.1f} % | {d_pad:.3g} |")
    print(f"| featstore extract (HDF5 written) | {t_ours:.1f} | {audio_s / t_ours:.2f} | {100 * res.padded_fraction:.1f} % | {d_ours:.3g} |")
    print(f"\nspeed-up (true-audio throughput): {t_pad / t_ours:.2f}x; items ok {res.ok}/{args.n}")
    if enc.group_norm_cnn:
        t_clip, t_batch = cnn_timing(enc, clips)
        print(f"group-norm CNN alone: one clip at a time {t_clip:.1f} s; featstore's masked batches of "
              f"{enc.cnn_chunk} length-sorted clips {t_batch:.1f} s ({t_clip / t_batch:.2f}x)")


@torch.inference_mode()
def cnn_timing(enc, clips: list[np.ndarray]) -> tuple[float, float]:
    """Wall seconds of the CNN over all clips one by one, and in featstore's masked length-sorted chunks."""
    from featstore.encoders.hf_ssl import masked_group_norm_cnn

    fe, dev = enc.model.feature_extractor, enc.device
    xs = [torch.from_numpy(enc.preprocess(c)).to(dev) for c in clips]
    t = time.perf_counter()
    for x in xs:
        fe(x[None])
    t_clip = time.perf_counter() - t
    xs.sort(key=len)
    t = time.perf_counter()
    for b in range(0, len(xs), enc.cnn_chunk):
        masked_group_norm_cnn(fe, xs[b : b + enc.cnn_chunk])
    return t_clip, time.perf_counter() - t


if __name__ == "__main__":
    main()

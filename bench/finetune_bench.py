"""Fine-tuning benchmark: seconds per epoch for ~1,000 short clips on CPU.

Builds the synthetic sibilant set (``featstore.synthetic.make_sibilant_set``: median ~0.15 s,
0.08-0.25 s; ``--clips-per-speaker`` clips per speaker) and runs ``featstore.finetune.finetune``
for ``--epochs`` epochs, then prints the one-off costs (the frozen parts' outputs + pooled inputs,
head-only phase) and the seconds per phase-2 epoch (training forward/backward on ~80 % of the clips
+ the validation forward on ~20 %), measured on ``--n`` clips and extrapolated linearly to 1,000.
The load average is printed before and after each run.

``--model``:

* ``wavlm-base`` (default): a base-size WavLM from ``WavLMConfig()`` (random weights: the same
  compute as the pretrained one), top 4 layers unfrozen;
* ``whisper-tiny.en``: ``../shared/models/whisper-tiny.en`` beside the project (real weights), top
  2 of its 4 encoder layers unfrozen, once per window in ``--windows`` (``full`` = the 30-s window,
  or seconds), with the ratio of each window's epoch time to the first window's, measured in the
  same run;
* any model directory.

    python bench/finetune_bench.py --n 1000
    python bench/finetune_bench.py --model whisper-tiny.en --n 1000 --windows full,1
    python bench/finetune_bench.py --n 200 --threads 1   # a busy machine: 1 thread can be much faster
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import base_wavlm, load_text  # noqa: E402

WHISPER_TINY = ROOT.parent / "shared/models/whisper-tiny.en"


def _windows(spec: str) -> list[float | None]:
    out: list[float | None] = []
    for part in spec.split(","):
        part = part.strip()
        out.append(None if part == "full" else float(part))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="clips (whole speakers, at least 8 speakers)")
    ap.add_argument("--clips-per-speaker", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--unfreeze-top", type=int, default=None, help="default: 4 (WavLM), 2 (Whisper)")
    ap.add_argument("--head-only-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--model", default="wavlm-base", help="wavlm-base (random weights), whisper-tiny.en, or a model directory")
    ap.add_argument("--windows", default="full,1", help="Whisper only: windows to time, 'full' or seconds (default full,1)")
    ap.add_argument("--cache-gb", type=float, default=2.0, help="memory for cached frozen outputs")
    args = ap.parse_args()

    from rich.console import Console

    from featstore.finetune import finetune
    from featstore.synthetic import make_sibilant_set

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_speakers = max(8, round(args.n / args.clips_per_speaker))  # >= 8: every class on both sides of the split
        manifest = make_sibilant_set(tmp / "data", n_speakers=n_speakers, clips_per_speaker=args.clips_per_speaker, seed=0)
        if args.model == "wavlm-base":
            model, what = str(base_wavlm(tmp / "wavlm-base")), "WavLMConfig() base, random weights"
        elif args.model == "whisper-tiny.en":
            if not WHISPER_TINY.is_dir():
                sys.exit(f"no model directory at {WHISPER_TINY}")
            model, what = str(WHISPER_TINY), "whisper-tiny.en (real weights)"
        else:
            model, what = args.model, args.model
        whisper = json.loads((Path(model) / "config.json").read_text()).get("model_type") == "whisper"
        windows = _windows(args.windows) if whisper else [None]
        top = args.unfreeze_top if args.unfreeze_top is not None else (2 if whisper else 4)
        n = n_speakers * args.clips_per_speaker
        print(f"{n} clips ({n_speakers} speakers), model {what}, unfreeze top {top}, batch {args.batch_size}, "
              f"{args.threads} thread(s), {args.epochs} epoch(s)")
        results = []
        for window in windows:
            label = ("window full 30 s" if window is None else f"window {window:g} s") if whisper else "model"
            options = {"context_seconds": window} if whisper else {}
            before = load_text()
            t0 = time.perf_counter()
            res = finetune(model, manifest, tmp / f"run{len(results)}", unfreeze_top=top,
                           head_only_steps=args.head_only_steps, epochs=args.epochs, batch_size=args.batch_size,
                           pooling=args.pooling, device="cpu", progress=False, patience=max(args.epochs, 1),
                           threads=args.threads, cache_gb=args.cache_gb, console=Console(file=io.StringIO()), **options)
            wall = time.perf_counter() - t0
            log = json.loads(res.log_path.read_text())
            timing, cache = log["timing"], log["frozen_cache"]
            k = int(np.argmin(timing["epoch_seconds"]))  # the epoch least disturbed by other work on the machine
            epoch_s, cpu_s = timing["epoch_seconds"][k], timing["epoch_cpu_seconds"][k]
            scale = 1000 / n
            results.append(epoch_s)
            ratio = f"; {results[0] / epoch_s:.2f}x faster per epoch than the first window" if whisper and len(results) > 1 else ""
            print(f"[{label}] train {res.n_train} / validation {res.n_val} clips; frozen parts unchanged: {res.frozen_unchanged}; "
                  f"frozen-output cache {cache['clips_cached']} clips ({cache['bytes'] / 2**20:.0f} MiB), "
                  f"{cache['clips_recomputed']} recomputed per batch")
            print(f"[{label}] one-off: frozen outputs + pooled inputs {timing['cache_seconds']:.1f} s, "
                  f"head-only phase ({args.head_only_steps} steps) {timing.get('head_phase_seconds', 0.0):.1f} s; "
                  f"phase-2 epochs: wall {timing['epoch_seconds']} s, process CPU {timing['epoch_cpu_seconds']} s; total wall {wall:.1f} s")
            print(f"[{label}] seconds per epoch (fastest of {len(timing['epoch_seconds'])}): {epoch_s:.1f} s for {n} clips -> "
                  f"{epoch_s * scale:.1f} s per epoch for 1,000 clips (process CPU {cpu_s * scale:.1f} s; one-off "
                  f"{timing['cache_seconds'] * scale:.1f} s per 1,000 clips){ratio}   [before: {before}; after: {load_text()}]")


if __name__ == "__main__":
    main()

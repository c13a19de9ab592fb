"""Fine-tuning benchmark: seconds per epoch for ~1,000 short clips with a base-size model on CPU.

Builds the synthetic sibilant set (``featstore.synthetic.make_sibilant_set``: median ~0.15 s,
0.08-0.25 s; 25 clips per speaker) and a base-size WavLM from ``WavLMConfig()`` (random weights:
the same compute as the pretrained one), runs ``featstore.finetune.finetune`` with the top 4 layers
unfrozen for ``--epochs`` epochs, and prints the one-off costs (CNN frames + pooled inputs of the
frozen backbone, head-only phase) and the seconds per phase-2 epoch (training forward/backward on
~80 % of the clips + the validation forward on ~20 %), measured on ``--n`` clips and extrapolated
linearly to 1,000. The machine load (``uptime``) is printed beside the figures.

    python bench/finetune_bench.py --n 1000
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import base_wavlm, load_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="clips (whole speakers of 25 clips, at least 200)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--unfreeze-top", type=int, default=4)
    ap.add_argument("--head-only-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--model", default=None, help="model directory (default: a random-weight base WavLM)")
    args = ap.parse_args()

    from rich.console import Console

    from featstore.finetune import finetune
    from featstore.synthetic import make_sibilant_set

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_speakers = max(8, round(args.n / 25))  # >= 8: every class on both sides of the split
        manifest = make_sibilant_set(tmp / "data", n_speakers=n_speakers, clips_per_speaker=25, seed=0)
        model = args.model or str(base_wavlm(tmp / "wavlm-base"))
        n = n_speakers * 25
        print(f"{n} clips ({n_speakers} speakers), model {'WavLMConfig() base, random weights' if not args.model else model}, "
              f"unfreeze top {args.unfreeze_top}, batch {args.batch_size}, {args.threads} thread(s)")
        print(f"before: {load_text()}")
        t0 = time.perf_counter()
        res = finetune(model, manifest, tmp / "run", unfreeze_top=args.unfreeze_top, head_only_steps=args.head_only_steps,
                       epochs=args.epochs, batch_size=args.batch_size, pooling=args.pooling, device="cpu", progress=False,
                       patience=max(args.epochs, 1), threads=args.threads, console=Console(file=io.StringIO()))
        wall = time.perf_counter() - t0
        timing = json.loads(res.log_path.read_text())["timing"]
    after = load_text()
    k = int(np.argmin(timing["epoch_seconds"]))  # the epoch least disturbed by other work on the machine
    epoch_s, cpu_s = timing["epoch_seconds"][k], timing["epoch_cpu_seconds"][k]
    scale = 1000 / n
    print(f"train {res.n_train} / validation {res.n_val} clips; frozen parts unchanged: {res.frozen_unchanged}")
    print(f"one-off: CNN frames + pooled inputs of the frozen backbone {timing['cache_seconds']:.1f} s, "
          f"head-only phase ({args.head_only_steps} steps) {timing.get('head_phase_seconds', 0.0):.1f} s")
    print(f"phase-2 epochs: wall {timing['epoch_seconds']} s, process CPU {timing['epoch_cpu_seconds']} s; total wall {wall:.1f} s")
    print(f"seconds per epoch (fastest of {len(timing['epoch_seconds'])}): {epoch_s:.1f} s for {n} clips -> {epoch_s * scale:.1f} s per epoch for 1,000 clips "
          f"(process CPU {cpu_s * scale:.1f} s; one-off {timing['cache_seconds'] * scale:.1f} s per 1,000 clips)   [{after}]")


if __name__ == "__main__":
    main()

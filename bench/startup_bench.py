"""Where the time before the first batch goes: imports, model loading, manifest reading, the first encode.

    python bench/startup_bench.py [--model DIR] [--n 1000]

Runs in a fresh process (the imports are what is measured); builds a base-size WavLM from
``WavLMConfig()`` (random weights) and a synthetic manifest when none is given. Prints each phase
in seconds and the load average.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

CHILD = r'''
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import featstore_cli.featstore_app  # noqa: F401  (the CLI, as `featstore extract` imports it)
import featstore.extract  # noqa: F401
from featstore.encoders.registry import load_encoder
t2 = time.perf_counter()
enc = load_encoder(sys.argv[1], device="cpu")
t3 = time.perf_counter()
from featstore.audio import probe_duration
from featstore.manifest import read_manifest
man = read_manifest(sys.argv[2])
[probe_duration(r.path) for r in man.rows]
t4 = time.perf_counter()
import numpy as np
clips = [np.zeros(2400, np.float32)] * 64
enc.encode(clips)
t5 = time.perf_counter()
enc.encode(clips)
t6 = time.perf_counter()
tf = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
print(f"import torch {t1 - t0:.2f} s; featstore + CLI {t2 - t1:.2f} s; load the model (config, weights; its content hash runs in the background) "
      f"{t3 - t2:.2f} s; read the manifest and probe {len(man.rows)} durations {t4 - t3:.2f} s; first encode of 64 "
      f"clips of 0.15 s {t5 - t4:.2f} s (the same batch again {t6 - t5:.2f} s); transformers imported: {bool(tf)}")
'''


def main() -> None:
    from benchutil import base_wavlm, load_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: a random-weight base WavLM)")
    ap.add_argument("--manifest", default=None, help="manifest (default: 1,000 synthetic clips)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=2, help="fresh processes (the first may read files from disk)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="startup_bench_"))
    model = args.model or str(base_wavlm(tmp / "wavlm-base"))
    manifest = args.manifest
    if manifest is None:
        from extract_bench import make_clips

        (tmp / "wav").mkdir()
        manifest = str(make_clips(tmp / "wav", args.n))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, model, manifest], env=env, text=True, capture_output=True,
                             check=True)
        print(f"run {k + 1}: {out.stdout.strip()}   [{load_text()}]")


if __name__ == "__main__":
    main()

"""Time one full layer-wise analysis on a fake store (default ~1,000 items x 13 layers x 768 dims).

    python bench/analysis_bench.py [--speakers 100] [--items-per-speaker 10] [--layers 13] [--dim 768]
                                   [--n-boot 200] [--n-shuffle 20] [--threads 2] [--workdir DIR]

Runs what ``probes analyze STORE --method svcca,pwcca,cka`` runs (label + speaker, bootstrap over
speakers, shuffled floors, layer-to-layer heatmaps) and prints the time of each stage.
Thread count is pinned via the BLAS environment variables before numpy is imported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchutil import load_average


def cpu_seconds() -> float:
    """CPU time of this process and its live children (joblib workers); psutil when present."""
    try:
        import psutil
    except ImportError:
        return time.process_time()
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=100)
    ap.add_argument("--items-per-speaker", type=int, default=10)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--n-shuffle", type=int, default=20)
    ap.add_argument("--methods", default="svcca,pwcca,cka")
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads (and joblib processes)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--breakdown", action="store_true", help="also time each method's profile and heatmap alone")
    ap.add_argument("--reuse", action="store_true", help="reuse WORKDIR/bench.h5 when it exists")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import numpy as np  # noqa: F401  (after the thread settings)

    from featstore.fakestore import write_fake_store
    from probes.analysis import layer_profile, layer_similarity, run_analysis

    work = args.workdir or Path(tempfile.mkdtemp(prefix="analysis_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "bench.h5"
    t = time.perf_counter()
    if not (args.reuse and store.exists()):
        store.unlink(missing_ok=True)
        write_fake_store(store, n_speakers=args.speakers, items_per_speaker=args.items_per_speaker,
                         num_layers=args.layers, dim=args.dim,
                         informative_layers=tuple(range(args.layers // 2, args.layers)), cue_strength=1.5,
                         speaker_strength=1.0)
    n_items = args.speakers * args.items_per_speaker
    print(f"fake store: {n_items} items, {args.speakers} speakers, {args.layers} layers x {args.dim} dims "
          f"({store.stat().st_size / 2**20:.0f} MiB) ready in {time.perf_counter() - t:.1f} s; threads={args.threads}; "
          f"load average {load_average():.1f}", flush=True)
    methods = args.methods.split(",")

    # warm the pooled cache the way a first `probes analyze` does, and time it separately
    t = time.perf_counter()
    layer_profile(store, methods=("cka",), n_boot=0, n_shuffle=0)
    warm = time.perf_counter() - t
    print(f"pooling all layers (first read, cached beside the store afterwards) + CKA only: {warm:.1f} s", flush=True)

    if args.breakdown:
        for method in methods:
            t = time.perf_counter()
            layer_profile(store, methods=(method,), n_boot=args.n_boot, n_shuffle=args.n_shuffle, n_jobs=args.threads)
            print(f"profile {method:5s} (label + speaker, {args.n_boot} boots, {args.n_shuffle} shuffles): "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            t = time.perf_counter()
            layer_similarity(store, method=method)
            print(f"layer-to-layer {method:5s} ({args.layers} x {args.layers}): {time.perf_counter() - t:.1f} s", flush=True)

    t, c = time.perf_counter(), cpu_seconds()
    res = run_analysis([store], methods=methods, n_boot=args.n_boot, n_shuffle=args.n_shuffle, out=work / "out",
                       n_jobs=args.threads)
    total, cpu = time.perf_counter() - t, cpu_seconds() - c
    print(f"full analyze call ({','.join(methods)}; label + group; profile + {args.layers}x{args.layers} heatmaps + plots): "
          f"{total:.1f} s = {total / 60:.2f} min wall, {cpu:.0f} CPU-s (workers still alive counted); "
          f"load average now {load_average():.1f}; {total / max(warm, 1e-9):.1f} x the pooling + CKA pass of this run",
          flush=True)
    p = res.profile
    real = p[~p.shuffled]
    for (method, target), e in real.groupby(["method", "target"], sort=False):
        best = e.loc[e.score.idxmax()]
        floor = p[p.shuffled & (p.method == method) & (p.target == target)].score
        print(f"  {method:5s} {target:6s} best layer {int(best.layer):2d}: {best.score:.3f} "
              f"[{best.ci_low:.3f}, {best.ci_high:.3f}]  shuffled floor mean {floor.mean():.3f}")
    print(f"outputs in {res.out}")


if __name__ == "__main__":
    main()

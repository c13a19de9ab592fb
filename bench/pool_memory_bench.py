"""Peak memory of pooling a large float16 store, next to a 10x smaller one: memory follows the chunk.

Builds two stores of one 768-wide float16 layer (default: 10,000,000 frames, ~15.4 GB on disk, and
1,000,000 frames; items of ~200 frames, or with ``--same-items`` the small store's items 10x shorter so
that both have about as many items), then pools each (``mean`` and ``stats`` over every item's true frames,
``probes.pooling.pooled_matrix(..., cache=False)``) in a fresh subprocess run under
``/usr/bin/time -v`` (when present), and prints for each: seconds, frames/s, the child's peak RSS
(``resource.getrusage(RUSAGE_SELF)`` at its end, and ``time -v``'s "Maximum resident set size"),
the RSS after imports and opening the store (before pooling), and the size of the pooled result
(one float32 vector per item, which grows with the number of items, not frames). The working
memory of pooling = peak - before - result; with streaming it stays near the chunk
(``featstore.store.CHUNK_BYTES`` of float64) whatever the number of frames. Ratios large/small are
printed beside; the load average before and after.

    python bench/pool_memory_bench.py [--frames 10000000] [--dim 768] [--frames-per-item 200]
                                      [--workdir /tmp/pool_memory_bench] [--keep] [--methods mean,stats]

Checks the free disk space first (both stores plus 10 %) and deletes the stores afterwards unless
``--keep`` (``--reuse`` then takes them instead of building them again). ``--frames 200000`` is a
one-minute check that the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def build_store(path: Path, n_frames: int, dim: int, per_item: int, seed: int = 0) -> dict:
    """A valid store of one float16 layer, items of 0.5-1.5 x ``per_item`` frames, written in batches
    through the store writer; frames are slices of one random block (fast to make)."""
    import numpy as np

    from featstore.store import StoreWriter

    rng = np.random.default_rng(seed)
    lengths = []
    total = 0
    while total < n_frames:
        t = int(min(n_frames - total, rng.integers(per_item // 2, per_item * 3 // 2 + 1)))
        lengths.append(t)
        total += t
    n = len(lengths)
    rows = [{"id": f"i{i:07d}", "label": "ab"[i % 2], "group": f"s{i % 500}"} for i in range(n)]
    attrs = {"encoder": "pool-memory-bench", "sample_rate": 16000, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    block = (rng.standard_normal((1 << 16, dim)) * 2).astype(np.float16)
    w = StoreWriter.create(path, rows, attrs, [dim], dtype="float16")
    t0 = time.perf_counter()
    batch, pos, at = [], 0, 0
    for i, t in enumerate(lengths):
        start = at % (len(block) - t)
        batch.append((i, {}, [block[start:start + t]]))
        at += 7919 * (i + 1)
        pos += t
        if pos >= 1 << 20 or i == n - 1:  # ~1M frames per write
            w.write_items(batch)
            batch, pos = [], 0
    w.finalize()
    return {"items": n, "frames": total, "seconds": time.perf_counter() - t0, "bytes": path.stat().st_size}


def child(store: str, method: str) -> None:
    """Pool one store in this (fresh) process; print a JSON line with time and memory."""
    import numpy as np

    import featstore
    from probes.pooling import pooled_matrix

    with featstore.open(store) as st:
        st.column("offset"), st.column("num_frames")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        x = pooled_matrix(st, 0, method, "clip", cache=False)
        seconds = time.perf_counter() - t0
        frames = int(st.column("num_frames").sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_kb": peak, "before_kb": before, "result_bytes": int(x.nbytes),
                      "finite": bool(np.isfinite(x).all()), "shape": list(x.shape), "frames": frames}))


def measure(store: Path, method: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store), "--method", method]
    timed = Path("/usr/bin/time").exists()
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if proc.returncode != 0:
        raise SystemExit(f"child failed on {store} ({method}):\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out["time_v_kb"] = int(m.group(1)) if m else None
    out["children_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over all children so far
    return out


def _frames_of(path: Path) -> int | None:
    """Frames of an existing store (None when absent or unreadable)."""
    if not path.exists():
        return None
    try:
        import featstore

        with featstore.open(path) as st:
            return int(st.column("num_frames").sum())
    except (OSError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--frames-per-item", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pool_memory_bench"))
    ap.add_argument("--methods", default="mean,stats")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--reuse", action="store_true", help="use stores of the right size left by an earlier --keep run")
    ap.add_argument("--same-items", action="store_true",
                    help="give the small store as many items as the large one (10x shorter items), so that the "
                         "pooled results have the same size and peak RSS compares directly")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="mean", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.method)
        return

    from benchutil import load_text

    import featstore.store as fs

    sizes = {"small": args.frames // 10, "large": args.frames}
    need = int(1.1 * sum(sizes.values()) * args.dim * 2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"{load_text()} before; disk: {free / 1e9:.1f} GB free in {args.workdir}, {need / 1e9:.1f} GB needed")
    if free < need and not args.reuse:
        raise SystemExit("not enough free disk space; use --workdir elsewhere or fewer --frames")
    chunk_frames = fs.CHUNK_BYTES // (8 * args.dim)
    print(f"chunk: {fs.CHUNK_BYTES / 2**20:.0f} MiB of float64 = {chunk_frames} frames of {args.dim} dims")
    stores = {}
    try:
        for name, n in sizes.items():
            per_item = max(2, args.frames_per_item // 10) if (name == "small" and args.same_items) else args.frames_per_item
            path = args.workdir / f"{name}_{n}x{args.dim}_f16_{per_item}fpi.h5"
            if args.reuse and _frames_of(path) == n:
                stores[name] = path
                print(f"reusing {path} ({n:,} frames, {path.stat().st_size / 1e9:.2f} GB)")
                continue
            for p in (path, fs.partial_path(path)):
                if p.exists():
                    p.unlink()
            info = build_store(path, n, args.dim, per_item)
            stores[name] = path
            print(f"built {name}: {info['frames']:,} frames, {info['items']:,} items, {info['bytes'] / 1e9:.2f} GB "
                  f"on disk, in {info['seconds']:.0f} s")
        rows = {}
        for method in args.methods.split(","):
            for name in ("small", "large"):
                r = measure(stores[name], method)
                rows[(method, name)] = r
                work = (r["peak_kb"] - r["before_kb"]) / 1024 - r["result_bytes"] / 2**20
                print(f"{method:5s} {name:5s}: {r['frames']:>11,} frames in {r['seconds']:7.1f} s "
                      f"({r['frames'] / r['seconds'] / 1e6:.2f} M frames/s); peak RSS {r['peak_kb'] / 1024:7.0f} MiB "
                      f"(time -v {(r['time_v_kb'] or 0) / 1024:.0f} MiB), before pooling {r['before_kb'] / 1024:.0f} "
                      f"MiB, result {r['result_bytes'] / 2**20:.0f} MiB, working memory {work:.0f} MiB; "
                      f"finite {r['finite']}")
        print("\nlarge / small (the small store is the baseline of this run):")
        for method in args.methods.split(","):
            s, g = rows[(method, "small")], rows[(method, "large")]
            ws = (s["peak_kb"] - s["before_kb"]) / 1024 - s["result_bytes"] / 2**20
            wg = (g["peak_kb"] - g["before_kb"]) / 1024 - g["result_bytes"] / 2**20
            print(f"  {method:5s}: frames x{g['frames'] / s['frames']:.1f}, seconds x{g['seconds'] / s['seconds']:.2f}, "
                  f"peak RSS x{g['peak_kb'] / s['peak_kb']:.2f}, working memory x{wg / max(ws, 1e-9):.2f} "
                  f"({ws:.0f} -> {wg:.0f} MiB)")
        layer_gb = sizes["large"] * args.dim * 2 / 1e9
        print(f"(reading the large layer whole, as pooling did before, would hold {layer_gb:.1f} GB of float16 plus a "
              f"{2 * layer_gb:.1f} GB float32 copy)")
        print(f"{load_text()} after")
    finally:
        if not args.keep:
            for p in stores.values():
                p.unlink(missing_ok=True)
            print(f"deleted the stores in {args.workdir} (--keep keeps them)")


if __name__ == "__main__":
    main()

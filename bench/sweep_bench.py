"""Benchmark of the default probe sweep, and a check of its logistic-regression numbers.

Builds (or takes with ``--store``) a ~1,000-item store with 13 layers x 768 dims (5-12 frames per
item), runs the default sweep (all layers x mean,stats,max,center x logreg,xgb x none,balanced,
plus attn-mlp x layers x weightings, 5 speaker-grouped folds) with ``--n-jobs 2``, and prints:

* wall time, cells, cells/s, the time spent in the probes' ``fit`` (per probe) versus the rest
  (pooling, process start-up, scoring): the estimators' cost is told apart from sweep overhead;
* the wall time of an identical second run (every cell reused from the cache);
* the cost of the true nested-CV headline: its inner-fold cells (``--nested auto``: every
  configuration when affordable, else the logreg ones) and their fit CPU beside the outer cells';
* the wall time of an identical second run (every cell reused from the cache);
* the best logistic-regression configuration's mean balanced accuracy against a plain
  scikit-learn ``cross_validate`` (StandardScaler + LogisticRegression, the same pooled
  features and the same folds); the difference must be below 0.5 points;
* the headline (nested, and the not-nested selection on other outer folds beside it), the load
  average, and ratios measured inside the run (second run / first run, inner / outer fit CPU).

Usage: ``python bench/sweep_bench.py [--store S.h5] [--workdir cache/bench] [--n-jobs 2] [--quick|--small]``
(``--small``: a 120-item x 3-layer x 32-dim store, a one-minute check that the script runs)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import load_average  # noqa: E402
from featstore.fakestore import write_fake_store  # noqa: E402


def plain_sklearn_bacc(store_path: Path, row: dict, cv: int, seed: int,
                       dtype: type = np.float32) -> tuple[float, np.ndarray]:
    """Mean balanced accuracy of StandardScaler + LogisticRegression on the same features/folds.

    The store's pooled vectors are float32 (what a user reads); ``dtype=np.float64`` repeats the
    fit in the probe's own precision, which tells rounding apart from a real difference.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featstore
    from featstore.cv import make_folds
    from probes.pooling import pooled_matrix

    with featstore.open(store_path) as st:
        labels = np.array([str(v).strip() for v in st.column("label")], dtype=object)
        rows = np.flatnonzero((st.column("status") == "ok") & (st.column("num_frames") > 0) & (labels != ""))
        x = pooled_matrix(st, int(row["layer"]), row["pooling"], row["scope"], rows, cache=False).astype(dtype)
        y = labels[rows].astype(str)
        groups = st.column("group")[rows]
    folds = make_folds(y, groups, cv, seed)
    cw = "balanced" if row["class_weight"] == "balanced" else None
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight=cw))
    res = cross_validate(pipe, x, y, cv=folds, scoring="balanced_accuracy", n_jobs=1)
    return float(res["test_score"].mean()), res["test_score"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="existing store to sweep (default: build a fake one)")
    ap.add_argument("--workdir", type=Path, default=Path("cache/bench"))
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 layers only (a smoke run)")
    ap.add_argument("--small", action="store_true", help="a tiny store (checks that the script runs)")
    ap.add_argument("--nested", default="auto", help="--nested of the sweep (auto, all, off, logreg,...)")
    ap.add_argument("--keep-cells", action="store_true", help="do not clear the cell cache before the first run")
    args = ap.parse_args()

    from probes.names import DEFAULT_CLASS_WEIGHTS, DEFAULT_POOLINGS, DEFAULT_PROBES
    from probes.sweep import headline_lines, run_sweep

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.store
    if store is None and args.small:
        store = args.workdir / "sweep_bench_small_120x3x32.h5"
        if not store.exists():
            write_fake_store(store, n_speakers=20, items_per_speaker=6, num_layers=3, dim=32,
                             informative_layers=(1,), cue_strength=1.0, frames_range=(5, 12), seed=0)
    if store is None:
        store = args.workdir / "sweep_bench_1000x13x768_cue015.h5"
        if not store.exists():
            t0 = time.perf_counter()
            write_fake_store(store, n_speakers=100, items_per_speaker=10, num_layers=13, dim=768,
                             informative_layers=(6, 7, 8), cue_strength=0.15, speaker_strength=1.0,
                             frames_range=(5, 12), seed=0)
            print(f"built {store} in {time.perf_counter() - t0:.1f} s")
    out = args.workdir / f"sweep_{store.stem}"
    if out.exists() and not args.keep_cells:
        shutil.rmtree(out)
    layers = [0, 6, 12] if args.quick else None
    kw = dict(layers=layers, poolings=DEFAULT_POOLINGS, probes=DEFAULT_PROBES, class_weights=DEFAULT_CLASS_WEIGHTS,
              cv=args.cv, n_jobs=args.n_jobs, out_dir=out, seed=0, progress=False, nested=args.nested)
    if args.small:
        kw["probe_params"] = {"attn-mlp": {"epochs": 5}, "xgb": {"n_estimators": 20}}
    load_before = load_average()

    t0 = time.perf_counter()
    res = run_sweep([store], **kw)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = run_sweep([store], **{**kw, "quiet": True})
    wall2 = time.perf_counter() - t0

    folds = res.folds[~res.folds["probe"].isin(["majority", "chance"])]
    fit_by_probe = folds.groupby("probe").agg(count=("fit_seconds", "count"), sum=("fit_seconds", "sum"),
                                              mean=("fit_seconds", "mean"), cpu=("fit_cpu_seconds", "sum"),
                                              cpu_mean=("fit_cpu_seconds", "mean"))
    fit_total = float(folds["fit_seconds"].sum())
    cpu_total = float(folds["fit_cpu_seconds"].sum())
    print("\n=== sweep benchmark ===")
    print(f"store: {store} ({res.summary['n_items'].iloc[0]} items), cpu cores: {os.cpu_count()}, n_jobs: {args.n_jobs}")
    n_inner = len(res.inner)
    print(f"cells: {res.n_cells} ({res.n_cells - n_inner} outer + {n_inner} inner-fold cells of the nested headline; "
          f"{res.n_fitted} fitted), wall: {wall:.1f} s ({wall / 60:.2f} min), {res.n_fitted / wall:.2f} cells/s")
    for probe, r in fit_by_probe.iterrows():
        print(f"  {probe:16s} {int(r['count']):5d} cells, fit wall {r['sum']:8.1f} s ({r['mean']:.2f} s/cell), "
              f"fit cpu {r['cpu']:8.1f} s ({r['cpu_mean']:.2f} s/cell)")
    inner_cpu = float(res.inner["fit_cpu_seconds"].sum()) if n_inner else 0.0
    if n_inner:
        probes_in = ",".join(sorted(set(res.inner["probe"])))
        print(f"  nested inner cells ({probes_in}): {n_inner}, fit cpu {inner_cpu:8.1f} s "
              f"({inner_cpu / n_inner:.2f} s/cell) = {inner_cpu / max(cpu_total, 1e-9):.2f} x the outer cells' fit cpu")
    t = res.timings
    print("phases (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    load = load_average()
    print(f"load average: {load_before:.2f} before, {load:.2f} after (on {os.cpu_count()} cores: > cores means "
          "other work shared the CPU)")
    est = (cpu_total + inner_cpu) / max(1, args.n_jobs) + t["prepare"] + t["features"] + t["tables"] + t["write"]
    print(f"estimate on an otherwise idle machine: {est:.0f} s ({est / 60:.1f} min) = fit cpu "
          f"{cpu_total + inner_cpu:.0f} s / {args.n_jobs} workers + parent phases")
    busy = wall * max(1, args.n_jobs)
    print(f"estimator fit time (sum over cells): {fit_total:.1f} s of {busy:.1f} worker-seconds; "
          f"sweep overhead (pooling, dispatch, predict, scoring, idle workers): {busy - fit_total:.1f} worker-s "
          f"({100 * (busy - fit_total) / busy:.0f} %)")
    print(f"identical second run: {wall2:.1f} s ({wall2 / wall:.3f} x the first), {again.n_fitted} cells fitted, "
          f"{again.n_cached} reused; tables identical: {again.summary.equals(res.summary)}")

    s = res.summary
    lr = s[s["probe"] == "logreg"].sort_values("balanced_accuracy_mean", ascending=False).iloc[0]
    t0 = time.perf_counter()
    plain, per_fold = plain_sklearn_bacc(store, lr.to_dict(), args.cv, 0)
    ours = res.folds[res.folds["config"] == lr["config"]].sort_values("fold")["balanced_accuracy"].to_numpy()
    diff = 100 * abs(plain - lr["balanced_accuracy_mean"])
    print(f"best logreg: {lr['config']}: sweep {lr['balanced_accuracy_mean']:.4f}, plain sklearn cross_validate "
          f"{plain:.4f} ({time.perf_counter() - t0:.1f} s); difference {diff:.3f} points "
          f"({'OK' if diff < 0.5 else 'FAIL'}: must be < 0.5); per fold max |diff| {np.abs(ours - per_fold).max():.2e}")
    plain64, per_fold64 = plain_sklearn_bacc(store, lr.to_dict(), args.cv, 0, dtype=np.float64)
    print(f"  same in float64 (the probe's precision): {plain64:.4f}, difference "
          f"{100 * abs(plain64 - lr['balanced_accuracy_mean']):.3f} points; per fold max |diff| "
          f"{np.abs(ours - per_fold64).max():.2e}")
    for line in headline_lines(res.best):
        print(line)
    print(f"target: default sweep < 10 min on 2 cores -> {'met' if wall < 600 else 'NOT met'} ({wall / 60:.2f} min)")


if __name__ == "__main__":
    main()

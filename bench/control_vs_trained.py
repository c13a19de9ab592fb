"""Trained weights beside a random-init control of the same architecture, on the same clips.

Probing papers report a randomly initialised model beside the trained one, so that "layer k
encodes X" can be told apart from "any network of this shape encodes X". On the espeak-ng speech
set of ``bench/padded_vs_exact.py`` (same cache), through the library, what these commands write:

    featstore extract --model whisper-tiny.en --manifest data/manifest.csv --out trained.h5
    featstore extract --model whisper-tiny.en --manifest data/manifest.csv --random-init 0 --out control.h5
    probes sweep trained.h5 control.h5 --pooling mean --probe logreg --class-weight none

(``--context-seconds S`` on both when given; ``--target group`` scores the speaker instead of the
label), then prints per layer the balanced accuracy of both with 95 % speaker-bootstrap intervals,
beside the majority and chance baselines of the same folds, and the sweep's headline of each store.

    nice python bench/control_vs_trained.py [--out cache/controls] [--context-seconds 2] [--seeds 0]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import load_text  # noqa: E402
from padded_vs_exact import common_args, extract_store, labelled, layer_table, prepare, sweep  # noqa: E402


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="random-init seeds, comma-separated (one control store each)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, manifest, ctx, options, tag = prepare(args)
    seconds = {}
    trained, seconds["trained"] = extract_store(manifest, args.model, out / f"{tag}.h5", ctx, **options)
    stores = [trained]
    for s in [int(v) for v in args.seeds.split(",") if v.strip()]:
        path, seconds[f"random-init {s}"] = extract_store(manifest, args.model, out / f"{tag}.random-init{s}.h5",
                                                          [*ctx, "--random-init", str(s)], random_init=s, **options)
        stores.append(path)
    res = sweep(stores, out / "sweep-control", args.n_boot, args.seed)
    names = labelled(stores, res.summary)
    n = int(res.summary["n_items"].max())
    print(f"\nper layer: label (/s/ /θ/ /f/ onset) balanced accuracy [95 % speaker-bootstrap interval], mean pooling "
          f"over each clip's true frames, logreg, 5 speaker-grouped folds; {n} clips, {args.speakers} speakers")
    print("\n".join(layer_table(res.summary, names)))
    best = res.best or {}
    heads = best.get("per_store") or {}
    print()
    for k, v in heads.items():
        h, other = v.get("headline", {}), v.get("other_folds", {})
        print(f"headline {names.get(k, k)}: {h.get('method', '?')} {h.get('bacc', float('nan')):.3f} "
              f"(not nested, other folds: {other.get('bacc', float('nan')):.3f}; best single config "
              f"{v.get('naive_best_config', '?')} {v.get('naive_best_bacc', float('nan')):.3f})")
    if res.notes:
        print("\nsweep notes: " + " | ".join(res.notes))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"after: {load_text()}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

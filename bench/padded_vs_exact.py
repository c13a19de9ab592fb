"""The common padded recipe as a measured store beside the padding-exact one, on the same clips.

1. Makes (once; cached) the espeak-ng speech set of ``bench/whisper_phonetic.py``: words that differ
   only in their initial fricative (/s/ /θ/ /f/: sin/thin/fin, ...), ``--speakers`` synthetic
   espeak-ng speakers, white noise at ``--snr-db``.
2. Extracts from ``--model`` (default ``../shared/models/whisper-tiny.en``, real weights), through
   the library, what these commands write:

       featstore extract --model M --manifest data/manifest.csv --out exact.h5
       featstore extract --model M --manifest data/manifest.csv --emulate-padding 1.0 --out padded.h5
       featstore extract --model M --manifest data/manifest.csv --emulate-padding 1.0 --keep-padding --out padded-kept.h5

   (``--context-seconds S`` on every one when given). With ``--wavlm`` also a base-size WavLM with
   random weights (``bench/benchutil.base_wavlm``: wavlm-base-plus's compute and preprocessing),
   exact, padded and padded with the padding kept.
3. ``probes sweep`` of all stores (library: ``probes.sweep.run_sweep``; every layer, mean pooling over
   each item's stored frames, logistic regression, 5 speaker-grouped folds) and prints the per-layer
   table side by side: balanced accuracy [95 % speaker-bootstrap interval], majority and chance.
4. ``probes doctor exact.h5 --padded padded-kept.h5`` (library: ``probes.doctor.run.run_doctor``;
   for WavLM also ``--padded padded.h5``) and prints the padding-and-pooling verdict and the
   confounds step (duration alone).

Several minutes on 2 cores; not part of the test suite.

    nice python bench/padded_vs_exact.py [--out cache/controls] [--context-seconds 2] [--wavlm]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import base_wavlm, load_text  # noqa: E402
from whisper_phonetic import LABELS, have_espeak, make_set  # noqa: E402

DEFAULT_MODEL = ROOT.parent / "shared/models/whisper-tiny.en"


def speech_set(out: Path, speakers: int, triples: int, snr_db: float, seed: int) -> Path:
    """The espeak-ng set (made once, then reused from ``out/data``)."""
    data = out / f"data-{speakers}x{triples}-snr{snr_db:g}-seed{seed}"
    manifest = data / "manifest.csv"
    if manifest.exists():
        return manifest
    if not have_espeak():
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    t0 = time.perf_counter()
    manifest = make_set(data, speakers, triples, snr_db, seed)
    print(f"speech set: {speakers} espeak-ng speakers x {triples} triples x 3 onsets ({', '.join(LABELS)}), "
          f"{snr_db:g} dB SNR -> {manifest} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return manifest


def extract_store(manifest: Path, model: str, out: Path, flags: list[str], **kwargs) -> tuple[Path, float]:
    """``featstore extract`` through the library; prints the command it stands for; returns (path, s)."""
    from featstore.extract import extract

    shown = ["featstore", "extract", "--model", model, "--manifest", str(manifest), *flags, "--out", str(out)]
    print("$ " + " ".join(shlex.quote(a) for a in shown), flush=True)
    t0 = time.perf_counter()
    res = extract(manifest, model, out, progress=False, rebuild_stale=True, **kwargs)
    seconds = time.perf_counter() - t0
    print(f"    {res.ok} of {res.items} items ok, {'reused' if res.already_done else f'{seconds:.0f} s'}", flush=True)
    return res.path, seconds


def sweep(stores: list[Path], out_dir: Path, n_boot: int, seed: int):
    """Every layer x mean pooling x logistic regression, 5 speaker-grouped folds (library)."""
    from probes.sweep import run_sweep

    cmd = ["probes", "sweep", *map(str, stores), "--pooling", "mean", "--probe", "logreg", "--class-weight", "none",
           "--scope", "clip", "--n-boot", str(n_boot), "--out", str(out_dir)]
    print("$ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    t0 = time.perf_counter()
    res = run_sweep(stores, scope="clip", poolings=("mean",), probes=("logreg",), class_weights=("none",), cv=5,
                    n_jobs=2, out_dir=out_dir, seed=seed, progress=False, quiet=True, n_boot=n_boot)
    print(f"    {res.n_cells} cells, {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def layer_table(summary, names: dict[str, str]) -> list[str]:
    """Per-layer markdown table: one column per store (bacc [95 % CI]) + majority and chance."""
    stores = list(names)
    s = summary[(summary["probe"] == "logreg") & summary["store"].isin(stores)].copy()
    s["layer"] = s["layer"].astype(int)
    header = ["layer", *[names[st] for st in stores], "majority", "chance"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in sorted(set(s["layer"])):
        cells = [str(layer)]
        for st in stores:
            r = s[(s["store"] == st) & (s["layer"] == layer)]
            if r.empty:
                cells.append("–")
                continue
            r = r.iloc[0]
            cells.append(f"{r['balanced_accuracy_mean']:.3f} [{r['bacc_ci_low']:.3f}, {r['bacc_ci_high']:.3f}]")
        b = s[s["layer"] == layer].iloc[0]
        cells += [f"{b['majority_bacc']:.3f}", f"{b['chance_bacc']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def store_names(summary) -> list[str]:
    return list(dict.fromkeys(summary.loc[summary["probe"] == "logreg", "store"]))


def labelled(stores: list[Path], summary) -> dict[str, str]:
    """Sweep store names -> their labels (``probes.names.store_label``)."""
    import featstore
    from probes.names import store_label

    names = store_names(summary)
    out = {}
    for name in names:
        path = next((p for p in stores if p.stem == name or str(p) == name or p.name == name), None)
        if path is None:
            out[name] = name
            continue
        with featstore.open(path) as st:
            out[name] = store_label(name, st.attrs)
    return out


def common_args(description: str) -> argparse.ArgumentParser:
    """The options this script shares with ``bench/control_vs_trained.py``: model, output folder,
    the speech set, the Whisper window, bootstraps and the seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--out", default=str(ROOT / "cache/controls"))
    ap.add_argument("--speakers", type=int, default=24)
    ap.add_argument("--triples", type=int, default=5)
    ap.add_argument("--snr-db", type=float, default=5.0)
    ap.add_argument("--context-seconds", default="2", help="Whisper window: seconds, or 'full' (30 s)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="data set and fold seed")
    return ap


def prepare(args: argparse.Namespace) -> tuple[Path, Path, list[str], dict, str]:
    """Check the model, make (once) the speech set and print the load average: returns the output
    folder, the manifest, the Whisper-window CLI flags, the matching extract() options and a store tag."""
    if not Path(args.model).is_dir():
        sys.exit(f"no model directory at {args.model}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"before: {load_text()}", flush=True)
    manifest = speech_set(out, args.speakers, args.triples, args.snr_db, args.seed)
    ctx = [] if args.context_seconds == "full" else ["--context-seconds", args.context_seconds]
    options = {} if not ctx else {"encoder_options": {"context_seconds": float(args.context_seconds)}}
    tag = "whisper" + (f"-ctx{args.context_seconds}" if ctx else "-full")
    return out, manifest, ctx, options, tag


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--pad-seconds", type=float, default=1.0)
    ap.add_argument("--wavlm", action="store_true", help="also a base-size random-weight WavLM, exact vs padded")
    ap.add_argument("--n-perm", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, manifest, ctx, options, tag = prepare(args)
    pad = f"{args.pad_seconds:g}"
    seconds = {}
    exact, seconds["exact"] = extract_store(manifest, args.model, out / f"{tag}.h5", ctx, **options)
    padded, seconds["padded"] = extract_store(manifest, args.model, out / f"{tag}.padded{pad}s.h5",
                                              [*ctx, "--emulate-padding", pad], emulate_padding=args.pad_seconds, **options)
    kept, seconds["padded-kept"] = extract_store(manifest, args.model, out / f"{tag}.padded{pad}s-kept.h5",
                                                 [*ctx, "--emulate-padding", pad, "--keep-padding"],
                                                 emulate_padding=args.pad_seconds, keep_padding=True, **options)
    stores = [exact, padded, kept]
    pairs = [(exact, kept)]
    if args.wavlm:
        wdir = out / "wavlm-base-random"
        if not (wdir / "config.json").exists():
            base_wavlm(wdir)
        wexact, seconds["wavlm exact"] = extract_store(manifest, str(wdir), out / "wavlm.h5", [])
        wpad, seconds["wavlm padded"] = extract_store(manifest, str(wdir), out / f"wavlm.padded{pad}s.h5",
                                                      ["--emulate-padding", pad], emulate_padding=args.pad_seconds)
        wkept, seconds["wavlm padded-kept"] = extract_store(
            manifest, str(wdir), out / f"wavlm.padded{pad}s-kept.h5", ["--emulate-padding", pad, "--keep-padding"],
            emulate_padding=args.pad_seconds, keep_padding=True)
        stores += [wexact, wpad, wkept]
        pairs += [(wexact, wpad), (wexact, wkept)]

    import numpy as np

    import featstore

    with featstore.open(exact) as e, featstore.open(padded) as p:
        ok = (e.items["status"] == "ok").to_numpy()
        dur = e.items.loc[ok, "num_samples"].to_numpy() / 16000
        diff = max(float(np.abs(e.frames(i, k) - p.frames(i, k)).max()) for i in np.flatnonzero(ok)[:50]
                   for k in e.layer_ids)
        truncated = p.attrs["padding_recipe"]["truncated"]
    print(f"\nclips: {int(ok.sum())}, duration median {np.median(dur):.2f} s [{dur.min():.2f}, {dur.max():.2f}]; "
          f"recipe cut {truncated} clip(s) longer than {pad} s; largest |padded - exact| over the true frames of "
          f"50 clips, every layer: {diff:.2g}", flush=True)

    res = sweep(stores, out / "sweep", args.n_boot, args.seed)
    names = labelled(stores, res.summary)
    print(f"\nper layer: balanced accuracy [95 % speaker-bootstrap interval], mean pooling over each item's stored "
          f"frames, logreg, 5 speaker-grouped folds; {int(ok.sum())} clips, {args.speakers} speakers")
    logreg = res.summary[res.summary["probe"] == "logreg"]
    for encoder in dict.fromkeys(logreg["encoder"]):
        group = {k: v for k, v in names.items() if k in set(logreg.loc[logreg["encoder"] == encoder, "store"])}
        print(f"\n{Path(str(encoder)).name}:")
        print("\n".join(layer_table(res.summary, group)))

    from probes.doctor.run import run_doctor

    verdicts = []
    for ex, pd_ in pairs:
        cmd = f"probes doctor {ex} --padded {pd_} --n-permutations {args.n_perm}"
        print(f"\n$ {cmd}", flush=True)
        t1 = time.perf_counter()
        rep = run_doctor(ex, padded=pd_, out_dir=out / f"doctor-{ex.stem}", n_permutations=args.n_perm,
                         seed=args.seed, progress=False)
        steps = {s.name: s for s in rep}
        pad_step = steps.get("padding and pooling")
        conf = next((s for s in rep if "confound" in s.name or "duration" in s.name), None)
        for s in (conf, pad_step):
            if s is not None:
                print(f"    {s.name}: {s.status.upper()} — {s.message}")
        if pad_step is not None:
            ev = pad_step.evidence
            keys = ("padded_source", "padded_minus_true", "padded_minus_true_duration_regressed_out",
                    "balanced_accuracy_duration_regressed_out")
            print("    evidence: " + ", ".join(f"{k}={ev[k]}" for k in keys if k in ev))
            verdicts.append((cmd, pad_step))
        print(f"    ({time.perf_counter() - t1:.0f} s)")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"after: {load_text()}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

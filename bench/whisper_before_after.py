"""The before/after loop on real weights: where does fine-tuning Whisper change its layers?

1. Makes a speech set with ``bench/whisper_phonetic.py``'s recipe: words that differ only in their
   initial fricative (/s/ /θ/ /f/: sin/thin/fin, ...), spoken by ``--speakers`` espeak-ng voices
   (accent x variant x pitch x speed = one speaker), white noise at ``--snr-db``.
2. Puts half of the speakers aside for the analysis (``featstore.cv.holdout_split``, fold 1 of 2,
   speaker-grouped, stratified): ``finetune.csv`` (the other half) and ``analysis.csv``.
3. Runs the commands a user would, and prints each one:

       featstore finetune --model whisper-tiny.en --manifest finetune.csv --out runs/whisper-ft \
           --context-seconds 2 --unfreeze-top 2 ...
       featstore extract --model whisper-tiny.en --manifest analysis.csv --context-seconds 2 --out pre.h5
       featstore extract --model runs/whisper-ft --manifest analysis.csv --out ft.h5      # recorded window
       probes analyze pre.h5 ft.h5 --target label --nuisance group --out analysis/

   The fine-tuned model never sees an analysis speaker (its own early stopping holds out a fifth
   of the fine-tuning speakers), so the "after" scores are on unseen speakers.
4. Prints the per-layer table from ``analysis/profile.csv`` (label and speaker scores before and
   after, 95 % speaker-bootstrap intervals, shuffled floors), writes it with the commands to
   ``before_after.md``, and plots ``before_after_<method>.png``.

Needs ``espeak-ng`` and ``../shared/models/whisper-tiny.en`` beside the project (``--model``).
Several minutes on 2 cores; not part of the test suite.

    nice python bench/whisper_before_after.py [--out cache/whisper_before_after] [--context-seconds 2|full]
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import load_text  # noqa: E402
from whisper_phonetic import LABELS, have_espeak, make_set  # noqa: E402

DEFAULT_MODEL = ROOT.parent / "shared/models/whisper-tiny.en"


def _cli_module(app: str) -> str:
    """The importable module of a console script (``cli.featstore_app`` or a namespaced one)."""
    for pkg in ("featstore_cli", "cli"):
        if importlib.util.find_spec(pkg) is not None and importlib.util.find_spec(f"{pkg}.{app}") is not None:
            return f"{pkg}.{app}"
    raise SystemExit(f"cannot find the {app} command module")


def run(program: str, args: list[str], log: list[str]) -> float:
    """Run ``program args`` (``featstore`` or ``probes``) as the console script would; returns seconds."""
    module = _cli_module("featstore_app" if program == "featstore" else "probes_app")
    shown = f"{program} " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    log.append(shown)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = f"import sys; sys.argv[0] = {program!r}; from {module} import main; main()"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "it/s]" not in line]
    for line in tail[-12:]:
        print(f"    {line}")
    if proc.returncode != 0:
        raise SystemExit(f"{program} exited with {proc.returncode}")
    print(f"    ({seconds:.0f} s)", flush=True)
    return seconds


def split_manifest(manifest: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """Half of the speakers for fine-tuning, the other half for the analysis (featstore.cv)."""
    from featstore.cv import holdout_split

    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    base = manifest.parent
    for r in rows:
        r["path"] = str((base / r["path"]).resolve())
    ft_idx, an_idx = holdout_split([r["label"] for r in rows], [r["speaker"] for r in rows], (1, 2), seed)
    paths = []
    for name, idx in (("finetune.csv", ft_idx), ("analysis.csv", an_idx)):
        p = out / name
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[i] for i in idx)
        paths.append(p)
    return paths[0], paths[1]


def table(profile_csv: Path, method: str) -> list[str]:
    """Markdown rows: per layer, label and speaker before/after with intervals and shuffled floors."""
    import pandas as pd

    p = pd.read_csv(profile_csv)
    p = p[p.method == method]
    stores = list(dict.fromkeys(p.store))
    pre, ft = stores[0], stores[1]
    cell: dict = {}
    for r in p.itertuples():
        cell[(r.store, int(r.layer), r.target, bool(r.shuffled))] = r
    lines = ["| layer | label before | label after | speaker before | speaker after |", "|---:|---:|---:|---:|---:|"]
    for layer in sorted({int(v) for v in p.layer}):
        out = [str(layer)]
        for target in ("label", "group"):
            for store in (pre, ft):
                real, floor = cell.get((store, layer, target, False)), cell.get((store, layer, target, True))
                if real is None:
                    out.append("-")
                    continue
                text = f"{real.score:.3f} [{real.ci_low:.3f}, {real.ci_high:.3f}]"
                out.append(text + (f" (floor {floor.score:.3f})" if floor is not None else ""))
        lines.append("| " + " | ".join(out) + " |")
    return lines


def plot(profile_csv: Path, method: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    p = pd.read_csv(profile_csv)
    p = p[p.method == method]
    stores = list(dict.fromkeys(p.store))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"label": "tab:blue", "group": "tab:red"}
    names = {"label": "label (/s/ /θ/ /f/)", "group": "speaker"}
    for target in ("label", "group"):
        for store, style, marker, face, when in ((stores[0], "--", "o", "white", "before"), (stores[1], "-", "s", None, "after")):
            e = p[(p.store == store) & (p.target == target) & ~p.shuffled].sort_values("layer")
            f = p[(p.store == store) & (p.target == target) & p.shuffled].sort_values("layer")
            ax.plot(e.layer, e.score, style, marker=marker, markerfacecolor=face or colors[target], color=colors[target],
                    label=f"{names[target]}, {when}")
            ax.fill_between(e.layer, e.ci_low, e.ci_high, color=colors[target], alpha=0.12)
            if len(f):
                ax.plot(f.layer, f.score, ":", color=colors[target], alpha=0.6, linewidth=1)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"{method} score")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(sorted({int(v) for v in p.layer}))
    ax.legend(fontsize=7, loc="best", handlelength=3.5)
    fig.text(0.5, 0.01, "dashed, open circles: before; solid, squares: after; dotted: shuffled floors; bands: 95 % speaker-bootstrap intervals",
             ha="center", fontsize=7, alpha=0.8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--out", default=str(ROOT / "cache/whisper_before_after"))
    ap.add_argument("--speakers", type=int, default=40)
    ap.add_argument("--triples", type=int, default=5)
    ap.add_argument("--snr-db", type=float, default=5.0)
    ap.add_argument("--context-seconds", default="2", help="window for every step: seconds, or 'full' (30 s)")
    ap.add_argument("--unfreeze-top", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--head-only-steps", type=int, default=300)
    ap.add_argument("--lr-backbone", type=float, default=1e-4)
    ap.add_argument("--lr-head", type=float, default=1e-3)
    ap.add_argument("--methods", default="svcca,cka")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--n-shuffle", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not have_espeak():
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    if not Path(args.model).is_dir():
        sys.exit(f"no model directory at {args.model}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"before: {load_text()}")
    t0 = time.perf_counter()
    manifest = make_set(out / "data", args.speakers, args.triples, args.snr_db, args.seed)
    ft_csv, an_csv = split_manifest(manifest, out, args.seed)
    print(f"speech set: {args.speakers} espeak-ng speakers x {args.triples} triples x 3 onsets ({', '.join(LABELS)}), "
          f"{args.snr_db:g} dB SNR, {time.perf_counter() - t0:.0f} s; fine-tuning speakers -> {ft_csv.name}, "
          f"analysis speakers -> {an_csv.name}")
    window = [] if args.context_seconds == "full" else ["--context-seconds", args.context_seconds]
    run_dir, pre, ft, analysis = out / "runs/whisper-ft", out / "pre.h5", out / "ft.h5", out / "analysis"
    commands: list[str] = []
    seconds = {}
    seconds["finetune"] = run("featstore", [
        "finetune", "--model", args.model, "--manifest", str(ft_csv), "--out", str(run_dir), *window,
        "--unfreeze-top", str(args.unfreeze_top), "--head-only-steps", str(args.head_only_steps),
        "--lr-backbone", f"{args.lr_backbone:g}", "--lr-head", f"{args.lr_head:g}", "--epochs", str(args.epochs),
        "--seed", str(args.seed), "--threads", str(args.threads), "--overwrite"], commands)
    seconds["extract pre"] = run("featstore", ["extract", "--model", args.model, "--manifest", str(an_csv), *window,
                                               "--out", str(pre), "--overwrite"], commands)
    seconds["extract ft"] = run("featstore", ["extract", "--model", str(run_dir), "--manifest", str(an_csv),
                                              "--out", str(ft), "--overwrite"], commands)
    seconds["analyze"] = run("probes", ["analyze", str(pre), str(ft), "--target", "label", "--nuisance", "group",
                                        "--method", args.methods, "--n-boot", str(args.n_boot), "--n-shuffle",
                                        str(args.n_shuffle), "--seed", str(args.seed), "--out", str(analysis)], commands)

    import featstore

    log = json.loads((run_dir / "log.json").read_text())
    with featstore.open(pre) as a, featstore.open(ft) as b:
        windows = (a.attrs.get("whisper_window_seconds"), b.attrs.get("whisper_window_seconds"), b.attrs.get("whisper_window_source"))
        n_items, n_spk = int((b.items["status"] == "ok").sum()), len(set(b.items["group"]))
    best = log["best"]
    print(f"\nfine-tuning: {log['split']['train']} train / {log['split']['val']} validation clips, best epoch {best['epoch']} "
          f"(validation balanced accuracy {best['val_balanced_accuracy']:.3f}; chance {1 / len(LABELS):.2f}); "
          f"frozen parts unchanged: {log['frozen_check']['unchanged']}; epochs {[h['epoch'] for h in log['epochs']]}")
    print(f"stores: {n_items} analysis items, {n_spk} unseen speakers; window pre {windows[0]} s, ft {windows[1]} s "
          f"(source: {windows[2]}); seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    report = []
    for method in args.methods.split(","):
        lines = table(analysis / "profile.csv", method)
        report += [f"\n{method}: score [95 % speaker-bootstrap interval] (floor = mean score with the target shuffled)\n", *lines]
        print("\n".join(report[-len(lines) - 1:]))
        png = plot(analysis / "profile.csv", method, out / f"before_after_{method}.png",
                   f"whisper-tiny.en, window {windows[0]} s: {method}, before vs after fine-tuning (unseen speakers)")
        print(f"\nplot: {png}")
    print("\ncommands:\n" + "\n".join(commands))
    (out / "before_after.md").write_text("\n".join(["```", *commands, "```", *report]) + "\n")
    print(f"tables and commands: {out / 'before_after.md'}")
    print(f"after: {load_text()}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

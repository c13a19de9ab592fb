"""Kill-stress test of `featstore extract`: random kills of a real extraction process, then resume.

Each trial starts the real command (``python -m cli.featstore_app extract ...``) on the same
clips, kills it at a random moment of an uninterrupted run's duration (SIGKILL mostly, as an
out-of-memory kill or ``kill -9`` would; some SIGTERM, some SIGINT = Ctrl-C), in some trials
kills the resumed run a second time, then runs the same command to the end and compares the
store with an uninterrupted reference run of the same command: every attribute (but
``created_at`` and ``extraction_stats``), every ``items/`` column and every layer, bit for bit.
It also checks that the final run kept every batch that was committed when the last run
stopped ("without redoing committed work beyond the batch in flight").

    python bench/kill_stress.py                           # ~1,000 clips, base-size WavLM, 50 trials
    python bench/kill_stress.py --n 80 --trials 4 --model tiny    # a quick try

Prints one line per trial and ends with ``K/N identical``. The default model is a base-size WavLM
built from ``WavLMConfig()`` with random weights (the compute of the pretrained one); ``tiny`` is
a 2-layer WavLM for trying the script.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import base_wavlm, load_text
from extract_bench import make_clips

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = (("SIGKILL", signal.SIGKILL, 0.7), ("SIGTERM", signal.SIGTERM, 0.15), ("SIGINT", signal.SIGINT, 0.15))


def tiny_wavlm(out: Path) -> Path:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    WavLMModel(cfg).eval().save_pretrained(out)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(out)
    return out


def command(manifest: Path, model: Path, out: Path, batch_seconds: float) -> list[str]:
    return [sys.executable, "-m", "cli.featstore_app", "extract", "--manifest", str(manifest), "--model", str(model),
            "--out", str(out), "--batch-seconds", str(batch_seconds)]


def run(cmd: list[str], kill_after: float | None = None, sig: int = signal.SIGKILL) -> tuple[int, str, float, bool]:
    """Run ``cmd``; with ``kill_after``, send ``sig`` that many seconds after the start.
    Returns ``(returncode, stderr, wall seconds, whether the signal was sent)``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent = False
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
            sent = True
    _, err = p.communicate()
    return p.returncode, err, time.perf_counter() - t0, sent


def committed(out: Path) -> int:
    d = out.with_name(out.name + ".partial")
    return len(list(d.glob("b*.batch"))) if d.is_dir() else 0


def pick_signal(rng: random.Random) -> tuple[str, int]:
    r, acc = rng.random(), 0.0
    for name, sig, p in SIGNALS:
        acc += p
        if r < acc:
            return name, sig
    return SIGNALS[0][:2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of clips")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--second-kill", type=float, default=0.3, help="share of trials that also kill the resumed run")
    ap.add_argument("--model", default="base", help="base (WavLMConfig(), random weights), tiny, or a model directory")
    ap.add_argument("--batch-seconds", type=float, default=10.0,
                    help="audio per batch (smaller than the default 60 s: more commit points per run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    from featstore.store import check_store, compare_stores

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kill_stress_"))
    (tmp / "wav").mkdir()
    manifest = make_clips(tmp / "wav", args.n)
    model = {"base": lambda: base_wavlm(tmp / "model"), "tiny": lambda: tiny_wavlm(tmp / "model")}.get(
        args.model, lambda: Path(args.model))()
    print(f"{args.n} clips, model {args.model}, --batch-seconds {args.batch_seconds:g}, {args.trials} trials; "
          f"{load_text()} before", flush=True)

    ref = tmp / "reference.h5"
    rc, err, t_ref, _ = run(command(manifest, model, ref, args.batch_seconds))
    if rc != 0:
        sys.exit(f"the reference run failed (exit {rc}):\n{err[-2000:]}")
    batches = int(re.search(r'"batches": (\d+)', _attrs_text(ref)).group(1))
    print(f"reference: {t_ref:.1f} s wall (process start to exit), {batches} batches", flush=True)

    identical = kept_all = 0
    walls = []
    for trial in range(1, args.trials + 1):
        out = tmp / f"trial{trial:03d}.h5"
        cmd = command(manifest, model, out, args.batch_seconds)
        kills = 2 if rng.random() < args.second_kill else 1
        events, t_trial, last_committed, stopped = [], 0.0, 0, False
        for k in range(kills):
            name, sig = pick_signal(rng)
            at = rng.uniform(0.05, 1.0) * t_ref
            rc, err, wall, sent = run(cmd, kill_after=at, sig=sig)
            t_trial += wall
            last_committed = committed(out)
            events.append(f"{name}@{at:.1f}s->rc {rc}, {last_committed} committed"
                          + (", store in place" if out.exists() else "") if sent else
                          f"(finished before {name}@{at:.1f}s)")
            stopped = stopped or sent
        rc, err, wall, _ = run(cmd)
        t_trial += wall
        walls.append(t_trial)
        m = re.search(r"resuming .*?: (\d+) of (\d+) batches already committed", err)
        if "already complete" in err:  # finished before the kill, or killed after the store was moved into place
            kept, keeps = last_committed, True
        else:  # resumed (a line says how many batches it kept) or started afresh (nothing was committed)
            kept = int(m.group(1)) if m else 0
            keeps = kept == last_committed
        diffs = ["final run failed: " + err.strip().splitlines()[-1]] if rc != 0 else compare_stores(ref, out)
        if rc == 0:
            diffs += [f"check: {p}" for p in check_store(out)]
            if out.with_name(out.name + ".partial").exists():
                diffs.append("the batch directory was left behind")
        identical += not diffs
        kept_all += keeps
        print(f"trial {trial:3d}: {'; '.join(events)}; final run kept {kept} batch(es)"
              f"{'' if keeps else f' (expected {last_committed})'} -> {'identical' if not diffs else 'DIFFERS: ' + '; '.join(diffs[:5])}"
              f"  [{t_trial:.1f} s]", flush=True)
        if not diffs:
            out.unlink()
    n = args.trials
    print(f"{identical}/{n} identical")
    print(f"{kept_all}/{n} resumed without redoing a committed batch")
    print(f"mean wall per trial (all runs of the trial): {sum(walls) / n:.1f} s = {sum(walls) / n / t_ref:.2f}x the "
          f"uninterrupted reference ({t_ref:.1f} s); {load_text()} after")
    if args.keep:
        print(f"work directory kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _attrs_text(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs["extraction_stats"])


if __name__ == "__main__":
    main()

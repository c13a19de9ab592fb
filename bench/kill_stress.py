"""Kill-stress test of `featstore extract`: random kills of a real extraction process, then resume.

Each trial starts the real command (``python -m featstore_cli.featstore_app extract ...``) on the same
clips, kills it at a random moment (SIGKILL mostly, as an out-of-memory kill or ``kill -9``
would; some SIGTERM, some SIGINT = Ctrl-C), in some trials kills the resumed run a second time,
then runs the same command to the end and compares the
store with an uninterrupted reference run of the same command: every attribute (but
``created_at`` and ``extraction_stats``), every ``items/`` column and every layer, bit for bit.
It also checks that the final run kept every batch that was committed when the last run
stopped ("without redoing committed work beyond the batch in flight").

Random moments follow the reference run's timeline, which the script records by watching the
batch directory: a moment is drawn uniformly over what is left of that timeline (start-up, each
batch, the finishing step), and the run is killed once it has committed as many batches as the
reference had at that moment, plus the remaining fraction of that stretch, rescaled by how fast
the last interrupted run went compared with the reference (the machine's load changes).

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
import threading
import time
from collections import Counter
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
    return [sys.executable, "-m", "featstore_cli.featstore_app", "extract", "--manifest", str(manifest), "--model", str(model),
            "--out", str(out), "--batch-seconds", str(batch_seconds)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def committed(out: Path) -> int:
    d = out.with_name(out.name + ".partial")
    try:
        return sum(1 for e in os.scandir(d) if e.name.endswith(".batch") and e.name.startswith("b"))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def run(cmd: list[str], out: Path, kill: tuple | None = None, ref_seen: list[float] | None = None,
        speed: float = 1.0) -> dict:
    """Run ``cmd`` while watching the batch directory of ``out`` (every 20 ms).

    ``kill = (sig, wait, delay)``: once ``wait`` new batches are committed (0 = at the start),
    wait ``delay`` reference seconds more, rescaled by this run's speed relative to the reference
    (its batch intervals so far vs ``ref_seen``'s, or ``speed`` before it has two batches), then
    send ``sig``. Returns the exit code, stderr, wall time, whether the signal was sent, the
    batches committed before the start, the time at which each new batch appeared and the speed."""
    before = committed(out)
    t0 = time.perf_counter()
    # SIGINT as in a terminal: a shell starting this script in the background (nohup ... &) makes
    # its children ignore SIGINT, and Python keeps an ignored SIGINT ignored
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    seen: list[float] = []

    def rate() -> float:
        if len(seen) < 2 or not ref_seen or before + len(seen) > len(ref_seen):
            return speed
        ref_dt = (ref_seen[before + len(seen) - 1] - ref_seen[before]) / (len(seen) - 1)
        return min(5.0, max(0.2, (seen[-1] - seen[0]) / (len(seen) - 1) / max(ref_dt, 1e-3)))

    fire_at = None if kill is None or kill[1] > 0 else t0 + kill[2] * speed
    sent = False
    while p.poll() is None:
        now = time.perf_counter()
        n = committed(out) - before
        while len(seen) < n:
            seen.append(now - t0)
        if kill is not None and not sent:
            if fire_at is None and len(seen) >= kill[1]:
                fire_at = now + kill[2] * rate()
            if fire_at is not None and now >= fire_at:
                p.send_signal(kill[0])
                sent = True
        time.sleep(0.02)
    reader.join()
    return {"rc": p.returncode, "err": "".join(err), "wall": time.perf_counter() - t0, "sent": sent,
            "before": before, "seen": seen, "speed": rate()}


def plan_kill(rng: random.Random, ref: dict, before: int, total: int) -> tuple[int, float, str, str]:
    """A random moment of the rest of an uninterrupted run, on the reference's timeline:
    ``(new batches to wait for, reference seconds after that, description, kind)``. The stretches
    are the start-up (to the first new batch), each further batch, and the finishing step,
    weighted by their durations in the reference run."""
    t = ref["seen"]
    segments = [(0, t[0], "during start-up", "start-up")]
    for j in range(before + 1, total):
        segments.append((j - before, t[j] - t[j - 1], f"during batch {j + 1}/{total}", "batch"))
    segments.append((total - before, ref["wall"] - t[total - 1], "while finishing", "finishing"))
    u = rng.uniform(0, sum(seg[1] for seg in segments))
    for wait, dur, what, kind in segments:
        if u <= dur:
            return wait, u, what, kind
        u -= dur
    return segments[-1][0], 0.0, segments[-1][2], segments[-1][3]


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
    r = run(command(manifest, model, ref, args.batch_seconds), ref)
    if r["rc"] != 0:
        sys.exit(f"the reference run failed (exit {r['rc']}):\n{r['err'][-2000:]}")
    total = len(r["seen"])
    print(f"reference: {r['wall']:.1f} s wall (process start to exit), {total} batches, first after "
          f"{r['seen'][0]:.1f} s, last after {r['seen'][-1]:.1f} s", flush=True)

    identical = kept_all = killed_trials = 0
    walls, kinds, signals_sent = [], Counter(), Counter()
    speed = 1.0  # how slow the machine is now compared with the reference run (from the last run)
    for trial in range(1, args.trials + 1):
        out = tmp / f"trial{trial:03d}.h5"
        cmd = command(manifest, model, out, args.batch_seconds)
        kills = 2 if rng.random() < args.second_kill else 1
        events, t_trial, last_committed, any_sent = [], 0.0, 0, False
        for k in range(kills):
            name, sig = pick_signal(rng)
            c = committed(out)
            if out.exists() or c >= total:
                break  # nothing left to interrupt
            wait, delay, what, kind = plan_kill(rng, r, c, total)
            got = run(cmd, out, (sig, wait, delay), r["seen"], speed)
            speed = got["speed"]
            t_trial += got["wall"]
            last_committed = committed(out)
            if got["sent"] and got["rc"] == 0 and sig != signal.SIGKILL:
                events.append(f"{name} {what} was sent but the run went on to finish")
            if got["sent"]:
                any_sent = True
                kinds[kind] += 1
                signals_sent[name] += 1
            events.append(f"{name} {what} (+{delay:.1f} s) -> exit {got['rc']}, {last_committed} committed"
                          + (", store in place" if out.exists() else "") if got["sent"] else
                          f"(finished before {name} {what})")
        killed_trials += any_sent
        fin = run(cmd, out, ref_seen=r["seen"], speed=speed)
        speed = fin["speed"]
        t_trial += fin["wall"]
        walls.append(t_trial)
        err = fin["err"]
        m = re.search(r"resuming .*?: (\d+) of (\d+) batches already committed", err)
        if "already complete" in err:  # killed after the store was moved into place
            kept, keeps = last_committed, True
        else:  # resumed (a line says how many batches it kept) or started afresh (nothing was committed)
            kept = int(m.group(1)) if m else 0
            keeps = kept == last_committed
        diffs = ["final run failed: " + err.strip().splitlines()[-1]] if fin["rc"] != 0 else compare_stores(ref, out)
        if fin["rc"] == 0:
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
    print(f"{killed_trials}/{n} trials interrupted at least once; {sum(signals_sent.values())} signals sent "
          f"({', '.join(f'{k} {v}' for k, v in signals_sent.most_common())}), landing "
          f"{', '.join(f'{k} {v}' for k, v in kinds.most_common())}")
    print(f"mean wall per trial (all runs of the trial): {sum(walls) / n:.1f} s = {sum(walls) / n / r['wall']:.2f}x the "
          f"uninterrupted reference ({r['wall']:.1f} s); {load_text()} after")
    if args.keep:
        print(f"work directory kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

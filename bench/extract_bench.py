"""Extraction benchmark, whole processes: the common padded recipe vs `featstore extract`.

Builds a synthetic set shaped like the motivating data (median ~0.15 s, 0.08-0.25 s) and a
base-size WavLM from ``WavLMConfig()`` (random weights: the same compute as the pretrained one),
measures a large float32 matrix product (the compute limit of this machine, same run: the fastest
of 5 single products, and the rate sustained over 3 s of them, before and after), then times
as separate processes, from the shell:

  (a) the common recipe: import, load the model, decode, pad/truncate to 1.0 s, batches of 8, full
      model (``SSLEncoder.common_pipeline``, the model's own forward);
  (b) ``python -m cli.featstore_app extract`` (decode, length-aware batches, encode, HDF5 written,
      padding audit on), once before (a) and once after it.

It prints true-audio seconds per second of each, their ratio (the recipe's time over the mean of
featstore's two runs: the host's speed drifts by several per cent over minutes, and a drift that
is linear in time cancels), featstore's time to first batch
(process start to the first batch's encode) and where the rest went, the model's FLOPs counted from
its config (CNN and transformer separately, each clip alone, no padding) and the achieved GFLOP/s
of the batch loop as a fraction of the matrix-product rate (and, robust to the host's drift, the
encode of one batch paired round by round with the products for as long, in this process, with
the A/B of the single-thread lanes against one call on all threads), the max abs difference to
solo runs,
and Whisper full-window clips/s with its FLOPs per window, in a process of its own (``--whisper DIR``;
default the shared tiny.en when present). Load averages beside every figure: compare ratios within one run.

    python bench/extract_bench.py --n 1000
    python bench/extract_bench.py --lanes-ab 60 15 5 --rounds 8    # only the lanes' A/B
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from benchutil import base_wavlm, load_text  # noqa: E402

DEFAULT_WHISPER = ROOT.parent / "shared/models/whisper-tiny.en"
if not DEFAULT_WHISPER.is_dir():
    DEFAULT_WHISPER = Path("/work/shared/models/whisper-tiny.en")


def make_clips(out: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dur = np.clip(rng.lognormal(np.log(0.15), 0.3, size=n), 0.08, 0.25)
    rows = []
    for i, d in enumerate(dur):
        x = (0.05 * rng.normal(size=int(d * 16000))).astype(np.float32)
        sf.write(str(out / f"c{i:05d}.wav"), x, 16000, subtype="PCM_16")
        rows.append({"path": f"c{i:05d}.wav", "label": "NLI"[i % 3], "speaker": f"s{i % 40}"})
    with (out / "clips.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "speaker"])
        w.writeheader()
        w.writerows(rows)
    return out / "clips.csv"


# ------------------------------------------------------------------------------------------ FLOPs
def conv_lengths(n: int, convs) -> list[int]:
    out = []
    for k, s in convs:
        n = max(0, (n - k) // s + 1)
        out.append(n)
    return out


def ssl_flops(cfg: dict, num_samples: int) -> tuple[float, float]:
    """(CNN, transformer) multiply-add FLOPs (2 per MAC) of one clip alone, from the config: every
    conv layer; feature projection, positional conv (the taps that meet a frame), per layer q/k/v/o,
    attention scores and sums, and the feed-forward."""
    convs = list(zip(cfg["conv_kernel"], cfg["conv_stride"]))
    dims = [1] + list(cfg["conv_dim"])
    lens = conv_lengths(num_samples, convs)
    cnn = sum(2.0 * dims[i] * k * dims[i + 1] * lens[i] for i, (k, _) in enumerate(convs))
    t, e, ff = lens[-1], cfg["hidden_size"], cfg["intermediate_size"]
    kpos, groups = cfg.get("num_conv_pos_embeddings", 128), cfg.get("num_conv_pos_embedding_groups", 16)
    pad = kpos // 2  # output j reads input j + tap - pad: count the taps that meet a frame
    taps = sum(min(t - 1, j - pad + kpos - 1) - max(0, j - pad) + 1 for j in range(t))
    proj = 2.0 * dims[-1] * e * t
    pos = 2.0 * e * (e // groups) * taps
    layer = 2.0 * t * (4 * e * e + 2 * e * ff) + 2.0 * 2 * t * t * e
    return cnn, proj + pos + cfg["num_hidden_layers"] * layer


def whisper_flops(cfg: dict, keep: int | None = None) -> float:
    """FLOPs of one full Whisper encoder window: conv stem, per layer projections, attention, MLP.
    ``keep``: the last layer only for its first ``keep`` queries (k/v over the whole window), as
    featstore computes it — the FLOPs actually done rather than the window's."""
    n_mels, d, ff, layers = cfg["num_mel_bins"], cfg["d_model"], cfg["encoder_ffn_dim"], cfg["encoder_layers"]
    t = cfg["max_source_positions"]
    stem = 2.0 * n_mels * d * 3 * (2 * t) + 2.0 * d * d * 3 * t
    full = 2.0 * t * (4 * d * d + 2 * d * ff) + 2.0 * 2 * t * t * d
    if keep is None:
        return stem + layers * full
    q = min(int(keep), t)
    last = 2.0 * t * 2 * d * d + 2.0 * q * (2 * d * d + 2 * d * ff) + 2.0 * 2 * q * t * d
    return stem + (layers - 1) * full + last


def sustained_matmul_rate(seconds: float = 3.0, n: int = 2048) -> float:
    """GFLOP/s of back-to-back ``n``^2 float32 products for ``seconds`` (all of them counted): the
    rate the machine keeps up over seconds, as the batch loop must, where :func:`matmul_rate`
    takes the fastest single product."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return done * 2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------------ (a)
def padded_recipe_main(model_dir: str, manifest: str, pad_seconds: float) -> None:
    """The child process of (a): everything a user of the common recipe runs."""
    t0 = time.perf_counter()
    from featstore.encoders.hf_ssl import SSLEncoder

    enc = SSLEncoder(model_dir)
    base = Path(manifest).parent
    paths = [base / r["path"] for r in csv.DictReader(open(manifest))]
    t_load = time.perf_counter() - t0
    frames = 0
    for b in range(0, len(paths), 8):
        clips = [sf.read(str(p), dtype="float32")[0] for p in paths[b : b + 8]]
        out = enc.common_pipeline(clips, pad_seconds=pad_seconds)
        frames += sum(len(o[0]) for o in out)
    print(json.dumps({"load_seconds": t_load, "frames": frames}))


def run_timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, unix start, stdout) of a child process."""
    start = time.time()
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return wall, start, res.stdout


# ------------------------------------------------------------------------------------------ Whisper
def whisper_throughput(model_dir: Path, n: int, repeats: int = 3) -> tuple[float, float, float, int, list[float]]:
    """Full-window clips/s (best of ``repeats``, one batch of ``n`` short clips), FLOPs per window
    (the whole window's, and those computed: the last layer's queries only for the kept frames),
    and every repeat's clips/s."""
    from featstore.encoders.registry import load_encoder

    enc = load_encoder(str(model_dir), device="cpu")
    rng = np.random.default_rng(1)
    clips = [(0.05 * rng.normal(size=int(rng.uniform(0.10, 0.25) * 16000))).astype(np.float32) for _ in range(n)]
    enc.encode(clips[:2])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc.encode(clips)
        times.append(time.perf_counter() - t)
    cfg = json.loads((model_dir / "config.json").read_text())
    keep = max(enc.num_frames(len(c)) for c in clips)  # the batch keeps its longest clip's frames
    return n / min(times), whisper_flops(cfg), whisper_flops(cfg, keep), enc.positions, [n / t for t in times]


def paired_efficiency(model_dir: Path, lengths: list[int], cfg: dict, rounds: int = 5,
                      batch_seconds: float = 60.0) -> tuple[list[tuple[float, float]], float, list[float], int]:
    """The encode's compute rate against the matrix product's, paired so that the host's drift
    (its speed moves by tens of % within minutes) cancels: in this process, ``rounds`` times one
    ``batch_seconds`` batch of clips drawn from ``lengths`` (the encode extraction runs, CNN and
    packed transformer), then back-to-back 2048^2 products for as long. Each round also encodes the
    batch as one call on all torch threads (``cpu_lanes = 1``), before or after the default
    (alternating), for the A/B of the single-thread lanes. Returns ``(encode GFLOP/s, matmul
    GFLOP/s)`` per round, the batch's audio seconds, and per round the one call's time over the
    default's (above 1: the lanes are faster), and how many lanes the default splits the batch into
    (1: one call either way)."""
    from featstore.encoders.hf_ssl import SSLEncoder

    enc = SSLEncoder(model_dir)
    rng = np.random.default_rng(3)
    picked, total = [], 0
    for k in rng.permutation(lengths):
        if total + k > batch_seconds * 16000:
            break
        picked.append(int(k))
        total += int(k)
    clips = [(0.05 * rng.normal(size=k)).astype(np.float32) for k in picked]
    fl = float(np.array([ssl_flops(cfg, len(c)) for c in clips]).sum())

    def timed(lanes: int | None) -> float:
        enc.cpu_lanes = lanes
        t = time.perf_counter()
        enc.encode(clips)
        return time.perf_counter() - t

    timed(1)  # warm-up: scratch buffers (each lane's), cached weights
    timed(None)
    out, speedups = [], []
    for r in range(rounds):
        one = timed(1) if r % 2 else None
        dt = timed(None)
        mm = sustained_matmul_rate(dt)
        one = timed(1) if one is None else one
        out.append((fl / dt / 1e9, mm))
        speedups.append(one / dt)
    enc.cpu_lanes = None
    import torch

    lanes = len(enc._lane_parts([torch.from_numpy(c) for c in clips]))
    return out, total / 16000, speedups, lanes


def cpu_time_check(model_dir: Path, lengths: list[int], cfg: dict, n: int = 150) -> tuple[float, float, float, float]:
    """Load-robust cross-check, in this process on one thread: achieved GFLOP/s of the CNN, the
    transformer and the whole encode of one typical batch (the ``n`` clips of median length), in
    CPU seconds, and the CPU-time rate of a 2048^2 matmul on that thread. CPU time is what another
    job on the machine inflates least."""
    import torch

    from featstore.encoders.hf_ssl import SSLEncoder
    from featstore.encoders.ssl_native import packed_forward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc = SSLEncoder(model_dir)
        mid = sorted(lengths)[max(0, len(lengths) // 2 - n // 2) :][:n]
        rng = np.random.default_rng(2)
        clips = [(0.05 * rng.normal(size=k)).astype(np.float32) for k in mid]
        fl = np.array([ssl_flops(cfg, len(c)) for c in clips]).sum(0)
        enc.encode(clips[:16])
        with torch.inference_mode():
            waves = [torch.from_numpy(c) for c in clips]
            c0 = time.process_time()
            feats = enc.cnn_outputs(waves)
            c1 = time.process_time()
            if enc.packed:  # what extraction runs (ssl_native.packed_forward)
                packed_forward(enc._net, enc.config, feats, enc.layer_ids)
            else:
                enc.forward_hidden_states(waves, feats)
            c2 = time.process_time()
        enc.encode(clips)
        c3 = time.process_time()
        a = torch.randn(2048, 2048)
        a @ a
        c4 = time.process_time()
        for _ in range(3):
            a @ a
        mm = 3 * 2.0 * 2048 ** 3 / (time.process_time() - c4) / 1e9
    finally:
        torch.set_num_threads(threads)
    return fl[0] / (c1 - c0) / 1e9, fl[1] / (c2 - c1) / 1e9, fl.sum() / (c3 - c2) / 1e9, mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of clips")
    ap.add_argument("--model", default=None, help="model directory (default: a random-weight base WavLM)")
    ap.add_argument("--batch-seconds", type=float, default=60.0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda")
    ap.add_argument("--amp", default="fp32", help="featstore extract --amp (fp32, bf16, fp16); the recipe stays float32")
    ap.add_argument("--solo-check", type=int, default=16, help="clips compared against solo runs")
    ap.add_argument("--skip-padded", action="store_true", help="time only featstore (no ratio)")
    ap.add_argument("--whisper", default=str(DEFAULT_WHISPER), help="Whisper model directory ('' to skip)")
    ap.add_argument("--whisper-clips", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the paired encode / matmul (and lanes A/B)")
    ap.add_argument("--lanes-ab", type=float, nargs="+", metavar="SECONDS",
                    help="only the single-thread lanes' A/B: for each batch size, --rounds paired rounds")
    ap.add_argument("--padded-child", nargs=3, metavar=("MODEL", "MANIFEST", "PAD"), help=argparse.SUPPRESS)
    ap.add_argument("--whisper-child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.padded_child:
        padded_recipe_main(args.padded_child[0], args.padded_child[1], float(args.padded_child[2]))
        return
    if args.whisper_child:  # a fresh process, as `featstore extract --model whisper-...` would be
        print(json.dumps(whisper_throughput(Path(args.whisper_child), args.whisper_clips)))
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    (tmp / "wav").mkdir()
    manifest = make_clips(tmp / "wav", args.n)
    model_dir = Path(args.model) if args.model else base_wavlm(tmp / "wavlm-base")
    cfg = json.loads((model_dir / "config.json").read_text())
    lengths = [sf.info(str(tmp / "wav" / f"c{i:05d}.wav")).frames for i in range(args.n)]
    audio_s = sum(lengths) / 16000
    if args.lanes_ab:
        print(f"single-thread lanes vs one call on {torch.get_num_threads()} torch threads, model {model_dir.name}, "
              f"clips drawn from {args.n} (median {np.median(lengths) / 16000:.3f} s), {args.rounds} rounds each, "
              f"the order alternating ({load_text()})")
        for b in args.lanes_ab:
            pairs, batch_s, speedups, lanes = paired_efficiency(model_dir, lengths, cfg, rounds=args.rounds, batch_seconds=b)
            print(f"  batch {batch_s:.1f} s, {lanes} lanes: one call's time over the lanes' {', '.join(f'{x:.2f}' for x in speedups)} "
                  f"-> median {float(np.median(speedups)):.2f}x ({min(speedups):.2f}-{max(speedups):.2f}x); matmul "
                  f"{min(m for _, m in pairs):.0f}-{max(m for _, m in pairs):.0f} GFLOP/s ({load_text()})", flush=True)
        return
    flops = np.array([ssl_flops(cfg, n) for n in lengths]).sum(0)
    mm = matmul_rate()
    sus = sustained_matmul_rate()
    print(f"{args.n} clips, {audio_s:.1f} s of audio, median {np.median(lengths) / 16000:.3f} s; model "
          f"{model_dir.name}, device {args.device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(f"model FLOPs (config, each clip alone): CNN {flops[0] / 1e9:.0f} GFLOP ({flops[0] / audio_s / 1e9:.2f} per "
          f"audio s), transformer {flops[1] / 1e9:.0f} GFLOP ({flops[1] / audio_s / 1e9:.2f} per audio s)")
    print(f"2048^2 float32 matmul: {mm:.0f} GFLOP/s (fastest of 5), {sus:.0f} GFLOP/s sustained over 3 s ({load_text()})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def featstore_run(tag: str) -> tuple[float, float, Path]:
        store = tmp / f"store-{tag}.h5"
        t, started, _ = run_timed([sys.executable, "-m", "cli.featstore_app", "extract", "--manifest", str(manifest),
                                   "--model", str(model_dir), "--out", str(store), "--device", args.device,
                                   "--amp", args.amp, "--batch-seconds", str(args.batch_seconds)], env)
        return t, started, store

    # featstore before and after the recipe (A B A): the host's speed drifts by several per cent
    # over minutes, and the ratio takes the mean of the two runs around the recipe's
    runs = [featstore_run("before")]
    print(f"(b) featstore extract: {runs[0][0]:.1f} s whole process ({load_text()})")
    t_pad = None
    if not args.skip_padded:
        t_pad, _, out = run_timed([sys.executable, str(Path(__file__).resolve()), "--padded-child", str(model_dir),
                                   str(manifest), "1.0"], env)
        pad_info = json.loads(out.strip().splitlines()[-1])
        print(f"(a) padded recipe: {t_pad:.1f} s whole process ({load_text()})")
        runs.append(featstore_run("after"))
        print(f"(b) featstore extract again: {runs[1][0]:.1f} s whole process ({load_text()})")
    t_ours, started, store = runs[0]
    mm_after = matmul_rate()
    sus_after = sustained_matmul_rate()
    print(f"matmul after: {mm_after:.0f} GFLOP/s fastest, {sus_after:.0f} sustained")

    import featstore
    from featstore.encoders.hf_ssl import SSLEncoder

    st = featstore.open(store)
    stats = dict(st.attrs["extraction_stats"])
    tim = stats.get("timings", {})
    ttfb = tim["first_batch_unix"] - started
    loop = tim["batch_loop"]
    enc = SSLEncoder(model_dir, device=args.device, amp=args.amp)
    ref = SSLEncoder(model_dir, device=args.device) if args.amp != "fp32" else None
    rng = np.random.default_rng(0)
    d_fp32 = 0.0
    d_ours = 0.0
    for i in rng.choice(args.n, size=min(args.solo_check, args.n), replace=False):
        clip = sf.read(str(tmp / "wav" / f"c{int(i):05d}.wav"), dtype="float32")[0]
        solo = enc._encode([clip])[0]
        d_ours = max(d_ours, max(float(np.abs(st.frames(int(i), k) - solo[k]).max()) for k in range(enc.num_layers)))
        if ref is not None:  # how far autocast moves the frames from float32, relative to each layer's largest value
            exact = ref._encode([clip])[0]
            d_fp32 = max(d_fp32, max(float(np.abs(st.frames(int(i), k) - exact[k]).max() / np.abs(exact[k]).max())
                                     for k in range(enc.num_layers)))
    rate = lambda f, s: f / s / 1e9  # noqa: E731
    print()
    print("| pipeline | wall s (whole process) | true-audio s/s |")
    print("|---|---:|---:|")
    if t_pad:
        print(f"| common: pad to 1.0 s, batch 8, full model | {t_pad:.1f} | {audio_s / t_pad:.2f} |")
    for (t, _, _), when in zip(runs, (", before the recipe", ", after the recipe") if t_pad else ("",)):
        print(f"| featstore extract (HDF5 written, audit on){when} | {t:.1f} | {audio_s / t:.2f} |")
    if t_pad:
        t_mean = sum(r[0] for r in runs) / len(runs)
        print(f"\nspeed-up (true-audio throughput, whole processes): {t_pad / t_mean:.2f}x (the recipe's time over the "
              f"mean of featstore's runs before and after it, {t_mean:.1f} s; {t_pad / runs[0][0]:.2f}x and "
              f"{t_pad / runs[1][0]:.2f}x against each)")
    ttfbs = [featstore.open(r[2]).attrs["extraction_stats"]["timings"]["first_batch_unix"] - r[1] for r in runs]
    print(f"time to first batch (process start -> first encode): {' and '.join(f'{x:.2f}' for x in ttfbs)} s; "
          f"{'the run before the recipe: ' if t_pad else ''}batch loop {loop:.1f} s "
          f"(encode {tim['encode']:.1f}, batch-file writes {tim['write']:.2f}, their fsync {tim.get('sync', 0):.2f} beside the "
          f"next encode, of which waited for {tim.get('commit_wait', 0):.2f}, waiting for decode {tim['decode_wait']:.2f}); "
          f"after the loop {t_ours - ttfb - loop:.1f} s (padding audit {tim.get('audit', float('nan')):.1f} while a thread "
          "copies the layers into the HDF5 file, then the rest of that copy, the file's attributes, its fsync and "
          "rename, and exit)")
    total = flops.sum()
    sus_mean = (sus + sus_after) / 2
    print(f"batch loop: {rate(total, loop):.0f} GFLOP/s = {100 * rate(total, loop) / mm:.0f} % of the fastest matmul "
          f"before ({mm:.0f}; {mm_after:.0f} after), {100 * rate(total, loop) / sus_mean:.0f} % of the sustained rate "
          f"(mean of {sus:.0f} before and {sus_after:.0f} after)")
    if "cnn" in tim:
        print(f"  CNN {tim['cnn']:.1f} s: {rate(flops[0], tim['cnn']):.0f} GFLOP/s ({100 * rate(flops[0], tim['cnn']) / mm:.0f} %); "
              f"transformer {tim['transformer']:.1f} s: {rate(flops[1], tim['transformer']):.0f} GFLOP/s "
              f"({100 * rate(flops[1], tim['transformer']) / mm:.0f} %)")
    pairs, batch_s, speedups, lanes = paired_efficiency(model_dir, lengths, cfg, rounds=args.rounds,
                                                        batch_seconds=args.batch_seconds)
    ratios = [e / m for e, m in pairs]
    print(f"paired, in this process: one batch of {batch_s:.1f} s of audio encoded, then 2048^2 products for as long, "
          f"{len(pairs)} rounds: encode {', '.join(f'{e:.0f}' for e, _ in pairs)} GFLOP/s vs matmul "
          f"{', '.join(f'{m:.0f}' for _, m in pairs)} -> median {100 * float(np.median(ratios)):.0f} % of the matmul "
          f"({100 * min(ratios):.0f}-{100 * max(ratios):.0f} %; {load_text()})")
    print(f"  single-thread lanes ({lanes}) vs one call on all threads, the same batch in the same rounds: one call's time over "
          f"the lanes' {', '.join(f'{x:.2f}' for x in speedups)} -> median {float(np.median(speedups)):.2f}x")
    cnn_r, tf_r, all_r, mm1 = cpu_time_check(model_dir, lengths, cfg)
    print(f"cross-check in CPU time, one thread, one batch of 150 median clips: CNN {cnn_r:.0f}, transformer "
          f"{tf_r:.0f}, whole encode {all_r:.0f} GFLOP/s = {100 * all_r / mm1:.0f} % of the one-thread matmul "
          f"({mm1:.0f} GFLOP/s per CPU second; {load_text()})")
    print(f"batched == solo: max abs diff {d_ours:.3g} over {args.solo_check} clips, all layers; padded frames "
          f"{100 * stats['padded_frames'] / max(stats['frames'] + stats['padded_frames'], 1):.1f} %")
    if ref is not None:
        print(f"--amp {args.amp} vs float32: max abs diff {100 * d_fp32:.2f} % of the layer's largest value "
              f"(over {args.solo_check} clips, all layers)")
    if args.whisper and Path(args.whisper).is_dir():
        child = subprocess.run([sys.executable, __file__, "--whisper-child", args.whisper, "--whisper-clips",
                                str(args.whisper_clips)], capture_output=True, text=True, check=True)
        cps, wf, done, pos, each = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"Whisper {Path(args.whisper).name}, full window ({pos} positions), in a process of its own: "
              f"{cps:.2f} clips/s (best of "
              f"{len(each)} batches of {args.whisper_clips} clips: {', '.join(f'{c:.2f}' for c in each)}); "
              f"{wf / 1e9:.1f} GFLOP per window, {done / 1e9:.1f} computed (the last layer's queries only for the "
              f"stored frames) -> {cps * done / 1e9:.0f} GFLOP/s computed = {100 * cps * done / 1e9 / mm:.0f} % of the "
              f"matmul rate ({load_text()})")
    print(f"\n{load_text()}")


if __name__ == "__main__":
    main()

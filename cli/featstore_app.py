"""`featstore` command line: extract, info, check, merge, demo."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Padding-exact frozen-feature store for speech models.")
console = Console(stderr=True, soft_wrap=True)

#: 1: every item failed, --strict with a failed item, or an I/O error (committed work is kept)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _esc(value: object) -> str:
    """``value`` as text that rich prints as it is (paths, ids and messages may hold ``[...]``)."""
    from rich.markup import escape

    return escape(str(value))


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """One red line, no traceback (the message is printed as it is: no rich markup)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@app.command()
def extract(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="CSV/TSV (path,label[,speaker,id,start,end,...]), a folder-per-label directory, a lhotse *.jsonl[.gz] (recordings, supervisions or cuts) or a Hugging Face dataset folder (save_to_disk)."),
    model: str = typer.Option(..., "--model", help="Alias (wavlm-base-plus), hub id, model directory, or a front end: logmel, mfcc, spectral."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store file (default cache/<model>__<manifest>.h5)."),
    group_column: str = typer.Option("speaker", help="Manifest column holding the speaker (CV groups)."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Which manifest columns hold what: ROLE=COLUMN,... with roles path, id, label, speaker, start, end; e.g. start=onset,end=offset,speaker=child_id."),
    manifest_format: str = typer.Option("auto", "--manifest-format", help="auto (by path), csv, folder, lhotse, hf."),
    split: Optional[str] = typer.Option(None, "--split", help="Hugging Face DatasetDict: the split to read (default: all, with a 'split' column)."),
    audio_cache: Optional[Path] = typer.Option(None, "--audio-cache", help="Hugging Face / lhotse audio held in memory is written here once as files (default cache/audio)."),
    layers: str = typer.Option("all", help="Layers to store: all, 0-12, 0,4,8."),
    device: str = typer.Option("auto", help="auto (cuda when present), cpu, cuda, cuda:1."),
    batch_seconds: float = typer.Option(60.0, help="Audio seconds per batch (length * clips of the longest clip)."),
    dtype: str = typer.Option("float32", help="float32 or float16 (half the size)."),
    amp: str = typer.Option("fp32", help="Autocast (GPU, or a CPU with bf16 units): fp32 (off), bf16, fp16."),
    crop_to_segment: bool = typer.Option(False, help="With start/end: encode only the segment's audio instead of the whole clip."),
    textgrid_tier: Optional[str] = typer.Option(None, help="Take segments from this tier of <audio>.TextGrid."),
    textgrid_labels: Optional[str] = typer.Option(None, help="Comma-separated interval labels to take (default: all non-empty)."),
    context_seconds: Optional[float] = typer.Option(None, help="Whisper only: shortened encoder window in seconds (default: the full 30-s window)."),
    shard: Optional[str] = typer.Option(None, help="Process shard K/N of the manifest into its own file."),
    emulate_padding: Optional[float] = typer.Option(None, "--emulate-padding", metavar="SECONDS", help="Store what the common recipe computes instead of exact frames: pad or cut every clip to SECONDS, full model on the padded batch (attention mask only where the checkpoint's feature extractor returns one), true frames cut out. Labelled padding_exact=false, recipe in padding_recipe."),
    keep_padding: bool = typer.Option(False, "--keep-padding", help="With --emulate-padding: store the whole padded sequence (every item has the padded length), for a pipeline that pools it."),
    random_init: Optional[int] = typer.Option(None, "--random-init", metavar="SEED", help="A control: the same architecture with seeded random weights (labelled control=random-init). SSL and Whisper models only."),
    overwrite: bool = typer.Option(False, help="Rebuild the store; the new one is built aside and replaces the old one only when complete."),
    strict: bool = typer.Option(False, help="Exit with code 1 when any item failed."),
) -> None:
    """Run the model once and store every layer's frames (resumes an interrupted run)."""
    from featstore.encoders.registry import ModelNotAvailable
    from featstore.extract import extract as run
    from featstore.manifest import ManifestError
    from featstore.store import PartialDamaged, StoreMismatch, partial_path
    from featstore.writelock import LockBusy, LockLost

    if dtype not in ("float32", "float16"):
        fail(f"--dtype must be float32 or float16, not {dtype!r}")
    if amp not in ("fp32", "bf16", "fp16"):
        fail(f"--amp must be fp32, bf16 or fp16, not {amp!r}")
    from featstore.extract import check_padding_options
    from featstore.encoders.registry import check_seed

    try:
        check_padding_options(emulate_padding, keep_padding)
        if random_init is not None:
            check_seed(random_init)
    except ValueError as exc:
        fail(str(exc))
    options = {}
    if context_seconds is not None:
        options["context_seconds"] = context_seconds
    if amp != "fp32":
        options["amp"] = amp
    try:
        res = run(
            manifest, model, out, group_column=group_column, layers=layers, device=device,
            batch_seconds=batch_seconds, dtype=dtype, crop_to_segment=crop_to_segment,
            textgrid_tier=textgrid_tier, textgrid_labels=textgrid_labels.split(",") if textgrid_labels else None,
            columns=columns, manifest_format=manifest_format, split=split, audio_cache=audio_cache,
            shard=shard, overwrite=overwrite, encoder_options=options, emulate_padding=emulate_padding,
            keep_padding=keep_padding, random_init=random_init, console=console,
        )
    except (ManifestError, ModelNotAvailable, StoreMismatch, LockBusy, LockLost, PartialDamaged, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/] before any batch was run; nothing was lost")
        raise typer.Exit(EXIT_INTERRUPTED)
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        fail(f"cannot read or write{where}: {exc.strerror or exc}; batches committed so far are kept: fix the "
             "cause and run the same command again to resume", EXIT_FAILED)
    if res.interrupted:
        how = "stopped by SIGTERM after the batch in flight" if res.stopped_by == "SIGTERM" else "interrupted"
        console.print(f"[yellow]{how}[/]: committed batches are kept in {_esc(partial_path(res.path))}; run the same "
                      "command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    if res.already_done:
        console.print(f"[green]{_esc(res.path)} is already complete[/] ({res.ok} of {res.items} items ok; built with "
                      "this command's inputs and settings; --overwrite rebuilds it)")
    else:
        _print_summary(res)
    if res.ok == 0:
        from collections import Counter

        counts = ", ".join(f"{s} {n}" for s, n in Counter(s for _, s, _ in res.failures).most_common())
        fail(f"every item failed ({len(res.failures)} of {res.items}: {counts}); the store {res.path} holds no "
             "frames — see the messages above or `featstore info --failures`", EXIT_FAILED)
    if strict and res.failures:
        raise typer.Exit(EXIT_FAILED)


def _print_summary(res) -> None:
    from collections import Counter

    if res.failures:
        console.print(f"[yellow]{len(res.failures)} item(s) not extracted:[/]")
        for i, (item, status, msg) in enumerate(res.failures):
            if i == 50:
                console.print(f"  ... and {len(res.failures) - 50} more (see `featstore info {_esc(res.path)} --failures`)")
                break
            console.print(f"  {_esc(item)}: [bold]{_esc(status)}[/] {_esc(msg)}")
    notes = Counter(n for _, n in res.notes)
    for note, count in notes.most_common(5):
        console.print(f"[dim]note: {count} item(s): {_esc(note)}[/]")
    t = Table(title=f"featstore extract -> {_esc(res.path)}")
    for col in ("items", "ok", "failed", "audio s", "wall s", "audio s/s", "clips/s", "padded frames"):
        t.add_column(col, justify="right")
    processed = res.processed
    t.add_row(
        str(res.items), str(res.ok), str(len(res.failures)), f"{res.audio_seconds:.1f}", f"{res.wall_seconds:.1f}",
        f"{res.audio_seconds / max(res.wall_seconds, 1e-9):.2f}", f"{processed / max(res.wall_seconds, 1e-9):.1f}",
        f"{100 * res.padded_fraction:.1f} %",
    )
    Console().print(t)


@app.command()
def info(
    file: Path = typer.Argument(..., help="A store file."),
    failures: bool = typer.Option(False, "--failures", help="List every item whose status is not ok."),
) -> None:
    """Model, items, layers, frames, statuses, duration quantiles, padding-exact flag, control / padded recipe."""
    import json

    import numpy as np

    import featstore

    try:
        store = featstore.open(file)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))
    with store:
        a = store.attrs
        items = store.items
        ok = items["status"] == "ok"
        dur = items.loc[ok, "num_samples"].to_numpy() / float(a["sample_rate"])
        t = Table(title=_esc(file), show_header=False)
        t.add_column("key", style="bold")
        t.add_column("value")
        t.add_row("encoder", f"{a['encoder']} ({a.get('encoder_revision', '')})")
        t.add_row("layers", f"{store.num_layers} stored: {a.get('layer_ids', list(range(store.num_layers)))}, dims {sorted({store.layer_dim(k) for k in store.layer_ids})}")
        t.add_row("items", f"{store.num_items} ({int(ok.sum())} ok)")
        t.add_row("statuses", ", ".join(f"{k}: {v}" for k, v in items["status"].value_counts().items()))
        t.add_row("frames", f"{int(items['num_frames'].sum())} (stride {a['frame_stride_samples']} samples at {a['sample_rate']} Hz)")
        if len(dur):
            q = np.quantile(dur, [0, 0.1, 0.5, 0.9, 1])
            t.add_row("duration s (min/10/50/90/max %)", " / ".join(f"{v:.3f}" for v in q))
        labels = items.loc[ok & (items["label"] != ""), "label"].value_counts()
        t.add_row("labels", ", ".join(f"{k}: {v}" for k, v in labels.items()) or "none")
        t.add_row("groups", str(items.loc[ok & (items["group"] != ""), "group"].nunique()))
        t.add_row("segments", str(int((items["segment_start_frame"] >= 0).sum())))
        t.add_row("padding_exact", str(bool(a.get("padding_exact"))))
        if a.get("padding_recipe") or a.get("control"):
            from probes.names import store_tags  # the one wording of a store's tags (no model, no probe run)

            t.add_row("control / recipe", "; ".join(store_tags(a)) + (f" (seed {a['random_init_seed']})" if a.get("control") else "")
                      + (f"; recipe {json.dumps(a['padding_recipe'], sort_keys=True)}" if a.get("padding_recipe") else ""))
        audit = a.get("padding_audit") or {}
        if audit.get("max_abs"):
            what = (f"the {audit['context_seconds']:g} s context window" if audit.get("reference") == "full-30s"
                    else f"pad to {audit.get('pad_seconds', '?')} s")
            versus = " (vs the full 30-s window)" if audit.get("reference") == "full-30s" else ""
            t.add_row("padding audit", f"{what} moves frames by up to {max(audit['max_abs']):.3g} (mean {np.mean(audit['mean_abs']):.3g}) over {audit['clips']} clips{versus}")
        t.add_row("dtype", str(a.get("dtype")))
        t.add_row("created", str(a.get("created_at")))
        t.add_row("extra columns", ", ".join(store.extra_columns) or "none")
        Console().print(t)
        if failures:
            bad = items.loc[~ok, ["id", "status", "error"]]
            for _, r in bad.iterrows():
                Console().print(f"{r['id']}: {r['status']} {r['error']}")


@app.command()
def check(file: Path = typer.Argument(..., help="A store file.")) -> None:
    """Verify the layout and its invariants; exit 1 when anything is wrong."""
    from featstore.store import check_store

    problems = check_store(file)
    if problems:
        for p in problems:
            console.print(f"[red]✗[/] {_esc(p)}")
        raise typer.Exit(1)
    Console().print(f"[green]✓[/] {file}: layout and invariants hold")


@app.command()
def merge(
    shards: list[Path] = typer.Argument(..., help="Shard stores written with --shard K/N (all N of them)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged store."),
) -> None:
    """Join shard stores into one store, item for item equal to a single run."""
    from featstore.merge import MergeError, merge_shards
    from featstore.writelock import LockBusy

    if out.exists():
        fail(f"{out} exists; remove it first")
    try:
        path = merge_shards(shards, out)
    except (MergeError, FileNotFoundError, ValueError, LockBusy) as exc:
        fail(str(exc))
    Console().print(f"[green]merged {len(shards)} shards -> {path}[/]")


def _cached_ssl_models() -> list[str]:
    """Aliases of SSL models already in the local Hugging Face cache (nothing is downloaded)."""
    import os

    from featstore.encoders.registry import ALIASES, ModelNotAvailable, resolve_pretrained

    found = []
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        for alias in ALIASES:
            if alias.startswith("whisper"):
                continue
            try:
                resolve_pretrained(alias)
                found.append(alias)
            except ModelNotAvailable:
                pass
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return found


@app.command()
def demo(
    out: Path = typer.Option(Path("cache/demo"), help="Where the data, stores and sweep go."),
    n_speakers: int = typer.Option(40, help="Synthetic speakers (children), one label each."),
    clips_per_speaker: int = typer.Option(25, help="Clips per speaker."),
    models: Optional[str] = typer.Option(None, help="Extra models to extract (comma-separated aliases/dirs); default: SSL models found in the local HF cache."),
    n_jobs: int = typer.Option(-1, help="Parallel sweep workers."),
) -> None:
    """The main job on the embedded default: a synthetic sibilant set (Normal / Lateral /
    Interdental inside word-length clips) -> acoustic front ends (+ any pretrained SSL model in the
    local HF cache) -> speaker-grouped probe sweep, segment vs whole-clip pooling -> report."""
    from featstore.extract import extract as run
    from featstore.synthetic import make_sibilant_set
    from probes.report import write_report
    from probes.sweep import run_sweep

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "data" / "manifest.csv"
    if not manifest.exists():
        console.print(f"[bold]1/3[/] synthetic sibilant set: {n_speakers} speakers x {clips_per_speaker} clips -> {manifest.parent}")
        make_sibilant_set(out / "data", n_speakers=n_speakers, clips_per_speaker=clips_per_speaker, context=True)
    names = ["logmel", "mfcc", "spectral"]
    extra = [m for m in models.split(",")] if models else _cached_ssl_models()
    if not extra:
        console.print("[dim]no pretrained SSL model in the local Hugging Face cache: acoustic front ends only "
                      "(random weights are never used for findings)[/]")
    stores = []
    for name in names + extra:
        console.print(f"[bold]2/3[/] extract {name}")
        res = run(manifest, name, out / "stores" / f"{Path(name).name}.h5", console=console)
        stores.append(res.path)
    for scope in ("segment", "clip"):
        console.print(f"[bold]3/3[/] probe sweep, pooling over the {'sibilant segment' if scope == 'segment' else 'whole clip'}")
        sweep_dir = out / f"sweep-{scope}"
        run_sweep(stores, scope=scope, poolings=("mean", "stats"), probes=("logreg",),
                  class_weights=("none", "balanced"), cv=5, n_jobs=n_jobs, out_dir=sweep_dir)
        write_report(sweep_dir)
    Console().print(f"[green]done[/]: stores in {out / 'stores'}, reports in {out}/sweep-segment/ and {out}/sweep-clip/ (report.md, report.html)")


from .finetune_cmd import finetune  # noqa: E402 - command module registers on this app

app.command("finetune")(finetune)


def main() -> None:
    from .errors import run_console_script

    run_console_script(app)


if __name__ == "__main__":
    main()

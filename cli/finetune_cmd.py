"""`featstore finetune`: partial fine-tuning to a checkpoint that `featstore extract` reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(EXIT_USAGE)


def finetune(
    model: str = typer.Option(..., "--model", help="Alias (wavlm-base-plus, whisper-tiny.en), hub id or model directory (wav2vec2, HuBERT, WavLM, data2vec-audio, Whisper)."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="CSV/TSV (path,label,speaker[,id,start,end,...]) or a folder-per-label directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: the fine-tuned model (save_pretrained), head.pt, head_config.json, log.json."),
    unfreeze_top: int = typer.Option(4, "--unfreeze-top", help="Transformer layers trained in phase 2, counted from the top (0: head only)."),
    freeze_feature_encoder: bool = typer.Option(True, "--freeze-feature-encoder/--train-feature-encoder", help="Keep the CNN feature encoder frozen."),
    head_only_steps: int = typer.Option(500, "--head-only-steps", help="Phase 1: optimizer steps for the head alone."),
    lr_backbone: float = typer.Option(1e-5, "--lr-backbone", help="Learning rate of the unfrozen backbone layers."),
    lr_head: float = typer.Option(1e-3, "--lr-head", help="Learning rate of the head."),
    pooling: str = typer.Option("mean", "--pooling", help="mean, attn (attentive) or weighted-layers (learned softmax over all layers, then mean)."),
    class_weight: str = typer.Option("balanced", "--class-weight", help="balanced or none."),
    fold: Optional[str] = typer.Option(None, "--fold", help="Validate on fold K/N of a speaker-grouped stratified split (default 1/5, ~20 %)."),
    group_column: str = typer.Option("speaker", "--group-column", help="Manifest column holding the speaker (split groups)."),
    epochs: int = typer.Option(10, "--epochs", help="Phase 2: most epochs (early stopping on validation balanced accuracy)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Clips per batch (length-aware batches)."),
    patience: int = typer.Option(3, "--patience", help="Stop after this many epochs without a better validation balanced accuracy."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, batch order, head initialisation and dropout."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda, cuda:1."),
    amp: str = typer.Option("fp32", "--amp", help="Autocast on CUDA: fp32 (off), bf16, fp16."),
    context_seconds: Optional[float] = typer.Option(None, "--context-seconds", help="Whisper only: train in a shortened encoder window of S seconds (default: the window recorded in the checkpoint, else the full 30 s); recorded in the fine-tuned checkpoint, which `featstore extract` then uses."),
    cache_gb: float = typer.Option(2.0, "--cache-gb", help="Memory for cached outputs of the frozen parts (CNN frames; Whisper: the input of the first unfrozen layer); beyond it they are recomputed."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default); on a busy machine 1 can be several times faster."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
) -> None:
    """Fine-tune a head plus the top layers of a speech SSL or Whisper model; save a checkpoint `featstore extract` reads."""
    from featstore.encoders.registry import ModelNotAvailable
    from featstore.encoders.whisper import RECORDED
    from featstore.finetune import FinetuneError
    from featstore.finetune import finetune as run
    from featstore.manifest import ManifestError

    try:
        res = run(
            model, manifest, out, unfreeze_top=unfreeze_top, freeze_feature_encoder=freeze_feature_encoder,
            head_only_steps=head_only_steps, lr_backbone=lr_backbone, lr_head=lr_head, pooling=pooling,
            class_weight=class_weight, fold=fold, group_column=group_column, epochs=epochs, batch_size=batch_size,
            seed=seed, device=device, amp=amp, patience=patience, overwrite=overwrite,
            context_seconds=RECORDED if context_seconds is None else context_seconds, cache_gb=cache_gb,
            threads=threads or None, console=console,
        )
    except (FinetuneError, ManifestError, ModelNotAvailable) as exc:
        _fail(str(exc))
    if not res.frozen_unchanged:
        console.print("[bold red]error:[/] frozen parameters changed during training (see log.json frozen_check)")
        raise typer.Exit(1)
    console.print(f"next: featstore extract --model {res.out} --manifest {manifest}")
    if res.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)

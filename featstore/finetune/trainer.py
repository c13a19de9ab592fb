"""The fine-tuning trainer: one method per phase.

:meth:`Trainer.prepare` loads the backbone and the clips, makes the speaker-grouped split
(:func:`featstore.cv.holdout_split`), the parameter groups and the head; :meth:`Trainer.cache_frozen`
computes what the frozen parts give once; :meth:`Trainer.train_head` is phase 1 (the head alone on
cached pooled inputs); :meth:`Trainer.train_top` is phase 2 (the head with the top layers, early
stopping on validation balanced accuracy); :meth:`Trainer.evaluate` scores the validation part;
:meth:`Trainer.verify_frozen` checks the frozen parameters bit-identical; :meth:`Trainer.save`
writes the checkpoint, the head and the log. :func:`finetune` runs them in order.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featstore.finetune.backbones import Backbone, open_backbone
from featstore.finetune.data import (VALIDATION_MANIFEST, eval_batches, load_items, parse_fold, shuffled_batches,
                                     train_batches, write_rows)
from featstore.finetune.errors import FinetuneError
from featstore.finetune.head import HEAD_CONFIG, HEAD_WEIGHTS, POOLINGS, ClassifierHead, collate, split_summary
from featstore.manifest import Manifest, read_manifest

LOG_NAME = "log.json"


@dataclass
class FinetuneConfig:
    """Every setting of a run (written to ``log.json``); :meth:`validate` normalises and checks them."""

    model: str
    manifest: Any
    out: Path
    unfreeze_top: int = 4
    freeze_feature_encoder: bool = True
    head_only_steps: int = 500
    lr_backbone: float = 1e-5
    lr_head: float = 1e-3
    pooling: str = "mean"
    class_weight: str | None = "balanced"
    fold: Any = None
    group_column: str = "speaker"
    epochs: int = 10
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    patience: int = 3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    head_dropout: float = 0.1
    context_seconds: Any = "recorded"
    cache_gb: float = 2.0
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> "FinetuneConfig":
        if self.pooling not in POOLINGS:
            raise FinetuneError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if self.class_weight not in (None, "none", "balanced"):
            raise FinetuneError(f"class_weight must be balanced or none, not {self.class_weight!r}")
        self.class_weight = None if self.class_weight == "none" else self.class_weight
        if self.amp in ("", "fp32", "none"):
            self.amp = None
        if self.amp not in (None, "bf16", "fp16"):
            raise FinetuneError(f"amp must be fp32, bf16 or fp16, not {self.amp!r}")
        for name, low in (("epochs", 0), ("batch_size", 1), ("head_only_steps", 0), ("patience", 1), ("unfreeze_top", 0)):
            if int(getattr(self, name)) < low:
                raise FinetuneError(f"{name} must be >= {low}, not {getattr(self, name)}")
        for name in ("lr_backbone", "lr_head"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"{name} must be > 0, not {getattr(self, name)}")
        if not self.cache_gb >= 0:
            raise FinetuneError(f"cache_gb must be >= 0, not {self.cache_gb}")
        if not isinstance(self.fold, tuple):
            self.fold = parse_fold(self.fold)
        self.out = Path(self.out)
        if self.out.exists() and any(self.out.iterdir()) and not self.overwrite:
            raise FinetuneError(f"{self.out} exists and is not empty: choose another --out or pass --overwrite")
        return self

    def to_log(self, manifest: Manifest, revision: str) -> dict[str, Any]:
        skip = {"manifest", "out", "overwrite", "progress", "fold"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return {"model": self.model, "revision": revision, "manifest": str(manifest.source), "manifest_sha256": manifest.sha256,
                "fold": f"{self.fold[0]}/{self.fold[1]}" if self.fold else None, **{k: v for k, v in d.items() if k != "model"}}


@dataclass
class FinetuneResult:
    """What one fine-tuning run did (also written to ``out/log.json``)."""

    out: Path
    labels: list[str]
    best_epoch: int
    best_val_balanced_accuracy: float
    history: list[dict[str, Any]]
    head_losses: list[float]
    param_groups: list[dict[str, Any]]
    frozen_unchanged: bool
    trainable_changed: int
    n_train: int
    n_val: int
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, status, message)
    stopped_early: bool = False
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.out / LOG_NAME


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _metrics(y: np.ndarray, logits: np.ndarray, weight: torch.Tensor | None) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    pred = logits.argmax(1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), weight=weight).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = balanced_accuracy_score(y, pred)
    return {"val_loss": round(float(loss), 6), "val_balanced_accuracy": round(float(bacc), 6),
            "val_accuracy": round(float(accuracy_score(y, pred)), 6)}


def _progress(console: Any, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                    console=console, disable=not (enabled and console.is_terminal), transient=True)


class Trainer:
    """Partial fine-tuning of one backbone on one manifest (see the module docstring)."""

    def __init__(self, config: FinetuneConfig, console: Any = None):
        from rich.console import Console

        self.cfg = config.validate()
        self.console = console or Console(stderr=True)
        self.t_start = time.perf_counter()
        self.timing: dict[str, Any] = {"epoch_seconds": [], "epoch_cpu_seconds": []}
        self.history: list[dict[str, Any]] = []
        self.head_losses: list[float] = []
        self.best: dict[str, Any] = {"epoch": -1, "val_balanced_accuracy": -1.0, "val_loss": float("inf")}
        self.best_state: dict[str, Any] = {}
        self.stopped_early = self.interrupted = False
        self.train_cache: dict[int, torch.Tensor] | None = None
        self.val_cache: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ prepare
    def prepare(self) -> None:
        """Backbone, clips, split, parameter groups, head, loss and optimizer; prints the table."""
        from featstore.cv import FoldError, holdout_split
        from featstore.encoders.registry import pick_device

        cfg, console = self.cfg, self.console
        self.device = pick_device(cfg.device)
        if cfg.amp and not self.device.startswith("cuda"):
            console.print(f"[dim]note: --amp {cfg.amp} applies on CUDA only; training in float32 on {self.device}[/]")
            cfg.amp = None
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.man = cfg.manifest if isinstance(cfg.manifest, Manifest) else read_manifest(cfg.manifest, cfg.group_column)
        self.backbone: Backbone
        self.backbone, self.revision = open_backbone(cfg.model, self.device, cfg.amp, cfg.context_seconds,
                                                     int(cfg.cache_gb * (1 << 30)))
        self.items, self.skipped, self.labels = load_items(self.man, self.backbone, console)
        items, labels = self.items, self.labels
        if len(labels) < 2:
            raise FinetuneError(f"need at least 2 labels to train a classifier, found {len(labels)} "
                                f"({', '.join(labels) or 'none'}) among {len(items)} usable row(s)")
        if not any(it.group for it in items):
            console.print("[yellow]warning:[/] no speaker column: the split is by clip, not by speaker (optimistic scores)")
            for it in items:
                it.group = it.id
        self.y = np.array([it.label for it in items], dtype=np.int64)
        try:
            train, val = holdout_split(self.y, [it.group or it.id for it in items], cfg.fold, cfg.seed)
        except FoldError as exc:
            raise FinetuneError(str(exc)) from None
        self.train_idx, self.val_idx = [int(i) for i in train], [int(i) for i in val]
        missing = sorted(set(range(len(labels))) - set(self.y[self.train_idx].tolist()))
        if missing:
            raise FinetuneError(f"the training split holds no clip of {', '.join(labels[i] for i in missing)}: "
                                f"use another --fold or --seed, or more speakers")
        self.frames = [it.frames for it in items]

        bb = self.backbone
        self.groups = bb.parameter_groups(cfg.unfreeze_top, cfg.freeze_feature_encoder)
        for p in bb.module.parameters():
            p.requires_grad_(False)
        self.back_train = self.groups["top"] + self.groups["cnn"]
        self.head = ClassifierHead(bb.hidden_size, len(labels), cfg.pooling, bb.num_hidden_states, cfg.head_dropout).to(self.device)
        self.head_params = list(self.head.parameters())
        self.table_rows = self._parameter_table()
        console.print(f"train {len(self.train_idx)} clips ({len({items[i].group for i in self.train_idx})} speakers), "
                      f"validation {len(self.val_idx)} clips ({len({items[i].group for i in self.val_idx})} speakers), "
                      f"labels {', '.join(labels)}, device {self.device}" + self._window_text())
        self.frozen_before = {n: _digest(p) for n, p in self.groups["frozen"]}
        self.trainable_before = {n: _digest(p) for n, p in self.back_train}

        counts = np.bincount(self.y[self.train_idx], minlength=len(labels)).astype(np.float64)
        self.weight = None
        if cfg.class_weight == "balanced":
            self.weight = torch.tensor(len(self.train_idx) / (len(labels) * np.maximum(counts, 1)), dtype=torch.float32)
        self.loss_fn = nn.CrossEntropyLoss(weight=self.weight.to(self.device) if self.weight is not None else None)
        self.y_t = torch.from_numpy(self.y)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        # the fused AdamW kernel: ~5x faster than the for-each one on CPU for a base model's top layers
        head_group = [{"params": self.head_params, "lr": cfg.lr_head, "weight_decay": cfg.weight_decay, "name": "head"}]
        try:
            self.opt = torch.optim.AdamW(head_group, fused=True)
        except (RuntimeError, ValueError):  # a device without the fused kernel
            self.opt = torch.optim.AdamW(head_group)

    def _window_text(self) -> str:
        d = self.backbone.describe()
        if d["kind"] != "whisper":
            return ""
        return f", window {d['whisper_window_mode']} ({d['whisper_window_seconds']:g} s)"

    def _parameter_table(self) -> list[dict[str, Any]]:
        from rich.table import Table

        cfg, bb, groups = self.cfg, self.backbone, self.groups
        cnn_frozen = [n for n, _ in groups["frozen"] if bb.is_cnn(n)]
        rest = [(n, p) for n, p in groups["frozen"] if not bb.is_cnn(n)]
        rows = [
            {"group": "head", "tensors": len(self.head_params), "params": sum(p.numel() for p in self.head_params),
             "trainable": True, "lr": cfg.lr_head, "phase": "1-2"},
            {"group": f"backbone top {bb.top} layer(s)", "tensors": len(groups["top"]),
             "params": sum(p.numel() for _, p in groups["top"]), "trainable": bool(groups["top"]),
             "lr": cfg.lr_backbone if groups["top"] else None, "phase": "2" if groups["top"] else "-"},
            {"group": bb.cnn_label, "tensors": len(groups["cnn"]) or len(cnn_frozen),
             "params": sum(p.numel() for n, p in bb.module.named_parameters() if bb.is_cnn(n)),
             "trainable": bool(groups["cnn"]), "lr": cfg.lr_backbone if groups["cnn"] else None,
             "phase": "2" if groups["cnn"] else "-"},
            {"group": "frozen rest (lower layers, projection, ...)", "tensors": len(rest),
             "params": sum(p.numel() for _, p in rest), "trainable": False, "lr": None, "phase": "-"},
        ]
        t = Table(title=f"finetune {cfg.model}: parameters")
        for col in ("group", "tensors", "parameters", "trainable", "lr", "phase"):
            t.add_column(col, justify="left" if col == "group" else "right")
        for r in rows:
            t.add_row(r["group"], str(r["tensors"]), f"{r['params']:,}", "yes" if r["trainable"] else "no",
                      f"{r['lr']:.0e}" if r["lr"] else "-", r["phase"])
        self.console.print(t)
        return rows

    # ------------------------------------------------------------------ frozen inputs
    def summaries(self, idx: list[int]) -> dict[int, torch.Tensor]:
        """The head's parameter-free pooling input per clip, from the backbone in eval mode."""
        self.backbone.train_mode(False)
        cache: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for batch in eval_batches(idx, self.frames, 2 * self.cfg.batch_size, self.backbone.equal_frames):
                hs, pm = self.backbone.hidden_states(self.items, batch)
                for i, piece in zip(batch, split_summary(self.cfg.pooling, self.head.summarize(hs, pm), pm)):
                    cache[i] = piece
        return cache

    def cache_frozen(self) -> None:
        """What the frozen parts give, once: the frozen part's outputs (CNN frames, or a Whisper
        prefix) and, while the backbone is frozen (phase 1, or nothing unfrozen), the pooled inputs."""
        t0 = time.perf_counter()
        self.backbone.prefill(self.items, self.train_idx + self.val_idx)
        if self.cfg.head_only_steps > 0 or not self.back_train:
            self.train_cache, self.val_cache = self.summaries(self.train_idx), self.summaries(self.val_idx)
        self.timing["cache_seconds"] = round(time.perf_counter() - t0, 3)

    # ------------------------------------------------------------------ steps
    def step(self, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        opt, scaler = self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            opt.step()

    def _cached_logits(self, cache: dict[int, torch.Tensor], batch: list[int]) -> torch.Tensor:
        summ, mask = collate(self.cfg.pooling, [cache[i] for i in batch], self.device)
        return self.head(summ, mask)

    def _cached_batches(self, idx: list[int]) -> Iterator[list[int]]:
        while True:
            yield from shuffled_batches(idx, self.cfg.batch_size, self.rng)

    def evaluate(self, idx: list[int], cache: dict[int, torch.Tensor]) -> dict[str, float]:
        """Validation loss, balanced accuracy and accuracy of the head on cached pooled inputs."""
        self.head.eval()
        logits = []
        step = 4 * self.cfg.batch_size
        with torch.no_grad():
            for s in range(0, len(idx), step):
                logits.append(self._cached_logits(cache, idx[s:s + step]).float().cpu())
        return _metrics(self.y[idx], torch.cat(logits).numpy(), self.weight)

    def consider(self, record: dict[str, Any]) -> bool:
        """Keep the state when it is the best so far (balanced accuracy; ties: lower loss)."""
        best = self.best
        better = (record["val_balanced_accuracy"] > best["val_balanced_accuracy"] or
                  (record["val_balanced_accuracy"] == best["val_balanced_accuracy"] and record["val_loss"] < best["val_loss"]))
        if better:
            best.update(epoch=record["epoch"], val_balanced_accuracy=record["val_balanced_accuracy"], val_loss=record["val_loss"])
            self.best_state["head"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
            self.best_state["backbone"] = {n: p.detach().cpu().clone() for n, p in self.back_train}
        return better

    def report(self, record: dict[str, Any], seconds: float, is_best: bool) -> None:
        name = "head only" if record["phase"] == "head" and record["epoch"] == 0 else f"epoch {record['epoch']}"
        self.console.print(f"{name:>10}  train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}  "
                           f"val bal.acc {record['val_balanced_accuracy']:.3f}  acc {record['val_accuracy']:.3f}  "
                           f"{seconds:.1f} s" + ("  [green]* best[/]" if is_best else ""))

    # ------------------------------------------------------------------ phase 1
    def train_head(self) -> None:
        """Phase 1: the head alone for ``head_only_steps`` steps on the cached pooled inputs."""
        steps = self.cfg.head_only_steps
        if steps <= 0:
            return
        t0 = time.perf_counter()
        self.head.train()
        batches = self._cached_batches(self.train_idx)
        with _progress(self.console, self.cfg.progress) as bar:
            task = bar.add_task("head only", total=steps, loss="-")
            for _ in range(steps):
                batch = next(batches)
                loss = self.loss_fn(self._cached_logits(self.train_cache, batch).float(), self.y_t[batch].to(self.device))
                self.step(loss, self.head_params)
                self.head_losses.append(round(float(loss.item()), 6))
                bar.update(task, advance=1, loss=f"{loss.item():.4f}")
        per_epoch = max(1, -(-len(self.train_idx) // self.cfg.batch_size))
        record = {"epoch": 0, "phase": "head", "steps": steps,
                  "train_loss": round(float(np.mean(self.head_losses[-per_epoch:])), 6),
                  **self.evaluate(self.val_idx, self.val_cache)}
        self.history.append(record)
        self.timing["head_phase_seconds"] = round(time.perf_counter() - t0, 3)
        self.report(record, self.timing["head_phase_seconds"], self.consider(record))

    # ------------------------------------------------------------------ phase 2
    def train_top(self) -> None:
        """Phase 2: the head with the unfrozen layers (each group at its learning rate), up to
        ``epochs`` epochs, stopping after ``patience`` epochs without a better validation score.
        With nothing unfrozen the head goes on training on the cached inputs."""
        cfg, bb = self.cfg, self.backbone
        if self.back_train:
            for _, p in self.back_train:
                p.requires_grad_(True)
            self.opt.add_param_group({"params": [p for _, p in self.back_train], "lr": cfg.lr_backbone,
                                      "weight_decay": cfg.weight_decay, "name": "backbone"})
        params = self.head_params + [p for _, p in self.back_train]
        since_best = 0
        for epoch in range(1, cfg.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            self.head.train()
            bb.train_mode(True)
            if self.back_train:
                batches = train_batches(self.train_idx, self.frames, cfg.batch_size, self.rng, bb.equal_frames)
            else:
                batches = shuffled_batches(self.train_idx, cfg.batch_size, self.rng)
            losses = []
            with _progress(self.console, cfg.progress) as bar:
                task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(batches), loss="-")
                for batch in batches:
                    if self.back_train:
                        hs, pm = bb.hidden_states(self.items, batch)
                        with bb.autocast():
                            logits = self.head(self.head.summarize(hs, pm), pm)
                    else:
                        logits = self._cached_logits(self.train_cache, batch)
                    loss = self.loss_fn(logits.float(), self.y_t[batch].to(self.device))
                    self.step(loss, params)
                    losses.append(float(loss.item()))
                    bar.update(task, advance=1, loss=f"{np.mean(losses):.4f}")
            if self.back_train:
                self.val_cache = self.summaries(self.val_idx)
            record = {"epoch": epoch, "phase": "head+top" if self.back_train else "head", "steps": len(batches),
                      "train_loss": round(float(np.mean(losses)), 6), **self.evaluate(self.val_idx, self.val_cache)}
            self.history.append(record)
            seconds = time.perf_counter() - t0
            self.timing["epoch_seconds"].append(round(seconds, 3))
            self.timing["epoch_cpu_seconds"].append(round(time.process_time() - c0, 3))
            is_best = self.consider(record)
            self.report(record, seconds, is_best)
            since_best = 0 if is_best else since_best + 1
            if since_best >= cfg.patience and epoch < cfg.epochs:
                self.stopped_early = True
                self.console.print(f"[dim]early stop: no better validation balanced accuracy for {cfg.patience} epoch(s)[/]")
                break

    # ------------------------------------------------------------------ end
    def restore_best(self) -> None:
        self.backbone.train_mode(False)
        self.head.eval()
        if not self.best_state:
            raise FinetuneError("nothing was trained (head_only_steps=0 and epochs=0, or interrupted at once)")
        self.head.load_state_dict(self.best_state["head"])
        with torch.no_grad():
            for n, p in self.back_train:
                p.copy_(self.best_state["backbone"][n].to(p.device))
        for p in self.backbone.module.parameters():
            p.requires_grad_(False)

    def verify_frozen(self) -> dict[str, Any]:
        """Digest every frozen tensor again: all must be bit-identical to before training."""
        frozen = self.groups["frozen"]
        changed = [n for n, p in frozen if _digest(p) != self.frozen_before[n]]
        trainable_changed = sum(_digest(p) != self.trainable_before[n] for n, p in self.back_train)
        check = {"frozen_tensors": len(self.frozen_before), "frozen_params": sum(p.numel() for _, p in frozen),
                 "unchanged": not changed, "changed": changed,
                 "trainable_tensors": len(self.back_train), "trainable_tensors_changed": int(trainable_changed)}
        if changed:
            self.console.print(f"[bold red]frozen parameters changed:[/] {', '.join(changed[:5])}")
        else:
            self.console.print(f"[green]✓[/] {len(self.frozen_before)} frozen tensors ({check['frozen_params']:,} parameters) "
                               f"bit-identical after training; {trainable_changed}/{len(self.back_train)} unfrozen tensors changed")
        if self.best["epoch"] == 0 and self.back_train:
            self.console.print("[yellow]note:[/] the best state is the head-only phase: the saved backbone equals the pre-trained one")
        return check

    def save(self, frozen_check: dict[str, Any]) -> FinetuneResult:
        """The checkpoint (``save_pretrained`` + feature extractor), ``head.pt``, ``head_config.json``,
        ``validation.csv`` and ``log.json``."""
        cfg, bb, out, items = self.cfg, self.backbone, self.cfg.out, self.items
        out.mkdir(parents=True, exist_ok=True)
        bb.save(out)
        torch.save(self.head.state_dict(), out / HEAD_WEIGHTS)
        encoder = bb.describe()
        head_cfg = {"labels": self.labels, "pooling": cfg.pooling, "hidden_size": bb.hidden_size,
                    "num_hidden_states": bb.num_hidden_states, "dropout": cfg.head_dropout,
                    "layer_weights": self.head.layer_weights(), "base_model": cfg.model, "base_revision": self.revision,
                    "best_epoch": self.best["epoch"], "val_balanced_accuracy": self.best["val_balanced_accuracy"],
                    "encoder": encoder}
        (out / HEAD_CONFIG).write_text(json.dumps(head_cfg, indent=2))
        write_rows(out / VALIDATION_MANIFEST, self.man, {items[i].id for i in self.val_idx}, cfg.group_column)
        seconds = time.perf_counter() - self.t_start
        self.timing["total_seconds"] = round(seconds, 3)
        log = {
            "format": "featstore-finetune", "version": 1,
            "config": {**cfg.to_log(self.man, self.revision), "device": self.device, "amp": cfg.amp},
            "encoder": encoder,
            "labels": self.labels,
            "class_weights": self.weight.tolist() if self.weight is not None else None,
            "split": {"train": len(self.train_idx), "val": len(self.val_idx),
                      "train_groups": sorted({items[i].group for i in self.train_idx}),
                      "val_groups": sorted({items[i].group for i in self.val_idx}),
                      "val_ids": [items[i].id for i in self.val_idx]},
            "skipped": [{"id": i, "status": s, "error": e} for i, s, e in self.skipped],
            "param_groups": self.table_rows,
            "head_phase": {"steps": cfg.head_only_steps, "loss": self.head_losses},
            "epochs": self.history,
            "best": self.best,
            "stopped_early": self.stopped_early,
            "interrupted": self.interrupted,
            "frozen_check": frozen_check,
            "frozen_cache": bb.cache.describe(),
            "layer_weights": self.head.layer_weights(),
            "timing": self.timing,
        }
        (out / LOG_NAME).write_text(json.dumps(log, indent=2))
        self.console.print(f"best epoch {self.best['epoch']}: val bal.acc {self.best['val_balanced_accuracy']:.3f} -> saved {out}")
        return FinetuneResult(
            out=out, labels=self.labels, best_epoch=self.best["epoch"],
            best_val_balanced_accuracy=self.best["val_balanced_accuracy"], history=self.history,
            head_losses=self.head_losses, param_groups=self.table_rows, frozen_unchanged=frozen_check["unchanged"],
            trainable_changed=frozen_check["trainable_tensors_changed"], n_train=len(self.train_idx),
            n_val=len(self.val_idx), skipped=self.skipped, stopped_early=self.stopped_early,
            interrupted=self.interrupted, seconds=seconds,
        )

    def run(self) -> FinetuneResult:
        """prepare -> cache_frozen -> train_head -> train_top -> restore_best -> verify_frozen -> save.
        An interruption (Ctrl-C) after the first record saves the best state so far."""
        self.prepare()
        try:
            self.cache_frozen()
            self.train_head()
            self.train_top()
        except KeyboardInterrupt:
            self.interrupted = True
            self.console.print("[yellow]interrupted[/]: saving the best state so far")
        self.restore_best()
        return self.save(self.verify_frozen())


def finetune(model: str, manifest: str | Path | Manifest, out: str | Path, *, threads: int | None = None,
             console: Any = None, **options: Any) -> FinetuneResult:
    """Fine-tune ``model`` (alias, hub id or model directory: wav2vec2-family or Whisper) on the
    labelled clips of ``manifest`` and save the checkpoint in ``out``.

    Phase 1 trains the head alone for ``head_only_steps`` steps (lr ``lr_head``); phase 2 trains
    the head and the top ``unfreeze_top`` transformer layers (lr ``lr_backbone``; also the CNN with
    ``freeze_feature_encoder=False``) for up to ``epochs`` epochs, stopping after ``patience``
    epochs without a better validation balanced accuracy (ties: lower validation loss). Validation
    is fold ``K/N`` of a speaker-grouped stratified split (default ``1/5``). The best state
    (phase 1's end counts as epoch 0) is saved in ``out``. Whisper: ``context_seconds`` chooses the
    window (default: the one recorded in the checkpoint, else the full 30 s; ``None``: the full
    window) and is recorded in the checkpoint. ``cache_gb`` bounds the memory of cached frozen
    outputs. Seeded: on CPU the same seed gives the same log. ``threads``: torch CPU threads for
    this call (restored afterwards; ``None`` leaves torch's setting). Options: the fields of
    :class:`FinetuneConfig`. Raises :class:`FinetuneError` for user mistakes.
    """
    if threads is not None and threads < 1:
        raise FinetuneError(f"threads must be >= 1, not {threads}")
    unknown = set(options) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"finetune() got unexpected option(s): {', '.join(sorted(unknown))}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return Trainer(FinetuneConfig(model=model, manifest=manifest, out=Path(out), **options), console).run()
    finally:
        torch.set_num_threads(previous)

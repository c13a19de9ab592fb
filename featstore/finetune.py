"""Partial fine-tuning of a speech SSL model into a checkpoint the store can extract.

``finetune(model, manifest, out)`` trains a classification head over masked, true-length pooling
of the backbone's frames (never a padded frame), in two phases: the head alone for
``head_only_steps`` steps, then the head with the top ``unfreeze_top`` transformer layers. The CNN
feature encoder and the lower layers stay frozen (verified bit-identical afterwards). The split is
speaker-grouped, early stopping watches validation balanced accuracy, and the best state is saved
as a plain Hugging Face model directory (``save_pretrained`` + the feature extractor config), so
``featstore extract --model OUT`` reads it like any other checkpoint; the head lies beside it
(``head.pt``, ``head_config.json``) with ``log.json`` and ``validation.csv`` (the held-out rows, a
manifest to compare held-out speakers before and after).

Batches are padding-exact as in extraction (:mod:`featstore.encoders.hf_ssl`): each clip is
normalised over its own samples, the CNN sees each clip unpadded (group-norm checkpoints) and the
transformer runs batched with the frame mask, through the model's own forward, with gradients.
A frozen CNN's frames are computed once per clip and reused; while the whole backbone is frozen
(the head-only phase, or ``unfreeze_top=0``) the head trains on cached pooled inputs. LayerDrop and
SpecAugment stay off (the backbone module is in eval mode; only the unfrozen layers and the head
use dropout): short clips have fewer frames than one SpecAugment mask.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featstore.audio import AudioError, load_audio
from featstore.manifest import Manifest, read_manifest

__all__ = ["POOLINGS", "FinetuneError", "FinetuneResult", "ClassifierHead", "finetune", "grouped_split",
           "parse_fold", "backbone_parameter_groups", "load_head"]

POOLINGS = ("mean", "attn", "weighted-layers")
HEAD_WEIGHTS, HEAD_CONFIG, LOG_NAME = "head.pt", "head_config.json", "log.json"
#: the validation rows (absolute paths): extract these to compare held-out speakers before/after
VALIDATION_MANIFEST = "validation.csv"


class FinetuneError(ValueError):
    """A user mistake: a bad option, an unusable manifest or model, nothing left to train on."""


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


# ---------------------------------------------------------------------------------------------
# the head


class ClassifierHead(nn.Module):
    """Linear classifier over masked pooling of the backbone's frames.

    ``mean``: mean of the last layer's frames; ``attn``: attention-weighted mean of the last layer's
    frames (a learned score per frame, padded frames masked out); ``weighted-layers``: a learned
    softmax-weighted sum of all ``hidden_states``, then the mean over frames. :meth:`summarize`
    holds the parameter-free part (what a frozen backbone's output can be cached as), ``forward``
    the learned part.
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", num_hidden_states: int = 1,
                 dropout: float = 0.1, attn_dim: int = 128):
        super().__init__()
        if pooling not in POOLINGS:
            raise FinetuneError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.pooling = pooling
        if pooling == "attn":
            self.attention = nn.Sequential(nn.Linear(hidden_size, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        if pooling == "weighted-layers":
            self.layer_logits = nn.Parameter(torch.zeros(num_hidden_states))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def summarize(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Parameter-free pooling input from ``hidden_states`` (each ``(B, T, D)``) and the bool
        frame ``mask`` ``(B, T)``: ``(B, D)`` masked means (mean), ``(B, L, D)`` per-layer masked
        means (weighted-layers) or the last layer's frames zeroed at padding ``(B, T, D)`` (attn)."""
        m = mask.unsqueeze(-1).float()
        if self.pooling == "attn":
            return hidden_states[-1].float() * m
        count = m.sum(1).clamp_min(1.0)
        if self.pooling == "mean":
            return (hidden_states[-1].float() * m).sum(1) / count
        return torch.stack([(h.float() * m).sum(1) / count for h in hidden_states], dim=1)

    def forward(self, summary: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "mean":
            z = summary
        elif self.pooling == "weighted-layers":
            w = torch.softmax(self.layer_logits, dim=0)
            z = (w[None, :, None] * summary).sum(1)
        else:
            if mask is None:
                raise ValueError("attentive pooling needs the frame mask")
            scores = self.attention(summary).squeeze(-1).masked_fill(~mask, float("-inf"))
            z = (torch.softmax(scores, dim=1).unsqueeze(-1) * summary).sum(1)
        return self.classifier(self.dropout(z))

    def layer_weights(self) -> list[float] | None:
        if self.pooling != "weighted-layers":
            return None
        return [float(v) for v in torch.softmax(self.layer_logits.detach(), 0)]


def _split_summary(pooling: str, summary: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-clip pieces of a batch summary (for caching), on the CPU."""
    s = summary.detach().cpu()
    if pooling == "attn":
        m = mask.cpu()
        return [s[i][m[i]].clone() for i in range(s.shape[0])]
    return [s[i].clone() for i in range(s.shape[0])]


def _collate(pooling: str, pieces: list[torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if pooling != "attn":
        return torch.stack(pieces).to(device), None
    lengths = torch.tensor([p.shape[0] for p in pieces])
    padded = nn.utils.rnn.pad_sequence(pieces, batch_first=True)
    mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
    return padded.to(device), mask.to(device)


def load_head(out: str | Path, map_location: str = "cpu") -> tuple[ClassifierHead, dict[str, Any]]:
    """The classification head saved by :func:`finetune` in ``out``, and its config (labels...)."""
    out = Path(out)
    cfg = json.loads((out / HEAD_CONFIG).read_text())
    head = ClassifierHead(cfg["hidden_size"], len(cfg["labels"]), cfg["pooling"], cfg["num_hidden_states"], cfg["dropout"])
    head.load_state_dict(torch.load(out / HEAD_WEIGHTS, map_location=map_location, weights_only=True))
    return head.eval(), cfg


# ---------------------------------------------------------------------------------------------
# splits and parameter groups


def parse_fold(spec: str | None) -> tuple[int, int] | None:
    """``"1/5"`` -> ``(1, 5)`` (validation = fold K of N); ``None`` -> ``None``."""
    if spec is None or str(spec).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or int(m[2]) < 2 or not 1 <= int(m[1]) <= int(m[2]):
        raise FinetuneError(f"bad fold {spec!r}: use K/N with 1 <= K <= N and N >= 2, e.g. --fold 1/5")
    return int(m[1]), int(m[2])


def grouped_split(labels: Sequence[int], groups: Sequence[str], fold: tuple[int, int] | None = None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speaker-grouped train/validation indices: fold K of a ``StratifiedGroupKFold(N)``, or by
    default fold 1 of 5 (a ~20 % validation split; 1 of G with only G < 5 groups). No group lies
    on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if n_groups < 2:
        raise FinetuneError(f"{n_groups} speaker group(s): a grouped validation split needs at least 2")
    k, n = fold or (1, min(5, n_groups))
    if n_groups < n:
        raise FinetuneError(f"{n_groups} speaker group(s) cannot make {n} folds: use fewer folds (--fold 1/{max(2, n_groups)}) "
                            f"or a manifest with more speakers")
    cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        splits = list(cv.split(np.zeros(len(labels)), np.asarray(labels), np.asarray(groups)))
    train, val = splits[k - 1]
    return np.sort(train), np.sort(val)


def backbone_parameter_groups(model: nn.Module, unfreeze_top: int, freeze_feature_encoder: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split a wav2vec2-family model's parameters: ``top`` (the top ``unfreeze_top`` transformer
    layers; with all layers unfrozen also the feature projection, positional convolution and
    encoder layer norm; with ``do_stable_layer_norm`` the final layer norm), ``cnn`` (the feature
    encoder, trainable only with ``freeze_feature_encoder=False``) and ``frozen`` (the rest)."""
    layers = model.encoder.layers
    n_layers = len(layers)
    if unfreeze_top < 0:
        raise FinetuneError(f"unfreeze_top must be >= 0, not {unfreeze_top}")
    top = min(unfreeze_top, n_layers)
    top_prefixes = [f"encoder.layers.{i}." for i in range(n_layers - top, n_layers)]
    if top == n_layers:
        top_prefixes += ["feature_projection.", "encoder.pos_conv_embed.", "encoder.layer_norm."]
    elif top > 0 and getattr(model.config, "do_stable_layer_norm", False):
        top_prefixes.append("encoder.layer_norm.")  # applied after the last layer
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"top": [], "cnn": [], "frozen": []}
    for name, p in model.named_parameters():
        if name.startswith("feature_extractor."):
            groups["frozen" if freeze_feature_encoder else "cnn"].append((name, p))
        elif any(name.startswith(pre) for pre in top_prefixes):
            groups["top"].append((name, p))
        else:
            groups["frozen"].append((name, p))
    return groups


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class _Item:
    id: str
    x: np.ndarray  # preprocessed samples
    label: int
    group: str
    frames: int
    pool: tuple[int, int]  # frames pooled over, [a, b)


def _load_items(man: Manifest, encoder: Any, console: Any) -> tuple[list[_Item], list[tuple[str, str, str]], list[str]]:
    from featstore.extract import segment_frames

    skipped: list[tuple[str, str, str]] = []
    kept: list[tuple[Any, np.ndarray, int, tuple[int, int]]] = []
    for row in man.rows:
        if row.status:
            skipped.append((row.id, row.status, row.error))
            continue
        if not row.label:
            skipped.append((row.id, "no_label", f"line {row.line}: empty label"))
            continue
        try:
            clip = load_audio(row.path, encoder.sample_rate)
        except AudioError as exc:
            skipped.append((row.id, exc.code, exc.message))
            continue
        n = encoder.num_frames(len(clip.samples))
        if n == 0:
            skipped.append((row.id, "too_short", f"{len(clip.samples) / clip.sample_rate:.3f} s is shorter than one frame "
                                                 f"({encoder.receptive_field_samples} samples)"))
            continue
        pool = (0, n)
        if row.start is not None:
            pool = segment_frames(encoder, n, row.start, row.end)
            if pool[1] <= pool[0]:
                skipped.append((row.id, "bad_segment", f"segment [{row.start:.3f}, {row.end:.3f}) s covers no frame"))
                continue
        kept.append((row, encoder.preprocess(clip.samples), n, pool))
    labels = sorted({r.label for r, *_ in kept})
    index = {lab: i for i, lab in enumerate(labels)}
    items = [_Item(r.id, x, index[r.label], r.group, n, pool) for r, x, n, pool in kept]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} row(s):[/]")
        for i, (item, status, msg) in enumerate(skipped):
            if i == 20:
                console.print(f"  ... and {len(skipped) - 20} more (see log.json)")
                break
            console.print(f"  {item}: [bold]{status}[/] {msg}")
    return items, skipped, labels


def _write_rows(path: Path, man: Manifest, ids: set[str], group_column: str) -> None:
    import csv

    rows = [r for r in man.rows if r.id in ids and not r.status]
    segments = any(r.start is not None for r in rows)
    cols = ["id", "path", "label", group_column] + (["start", "end"] if segments else []) + list(man.extra_columns)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            seg = [r.start if r.start is not None else "", r.end if r.end is not None else ""] if segments else []
            w.writerow([r.id, str(Path(r.path).resolve()), r.label, r.group] + seg + [r.extra.get(c, "") for c in man.extra_columns])


def _eval_batches(idx: Sequence[int], frames: Sequence[int], batch_size: int, equal_frames: bool) -> list[list[int]]:
    order = sorted(idx, key=lambda i: (frames[i], i))
    return _chunk(order, frames, batch_size, equal_frames)


def _chunk(order: Sequence[int], frames: Sequence[int], batch_size: int, equal_frames: bool) -> list[list[int]]:
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= batch_size or (equal_frames and frames[i] != frames[cur[0]])):
            batches.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(cur)
    return batches


def _train_batches(idx: Sequence[int], frames: Sequence[int], batch_size: int, rng: np.random.Generator,
                   equal_frames: bool, window: int = 32) -> list[list[int]]:
    """Length-aware and shuffled: a random order, sorted by length inside windows of
    ``window * batch_size`` clips, cut into batches, batches in random order."""
    perm = [int(i) for i in rng.permutation(np.asarray(idx))]
    span = window * batch_size
    batches: list[list[int]] = []
    for s in range(0, len(perm), span):
        chunk = sorted(perm[s:s + span], key=lambda i: frames[i])  # stable: ties keep the random order
        batches += _chunk(chunk, frames, batch_size, equal_frames)
    return [batches[k] for k in rng.permutation(len(batches))]


# ---------------------------------------------------------------------------------------------
# the differentiable, padding-exact forward


class _Backbone:
    """The encoder's model run with gradients; a frozen CNN's frames are cached per clip."""

    def __init__(self, encoder: Any, train_cnn: bool, amp: str | None):
        self.enc = encoder
        self.model = encoder.model
        self.device = encoder.device
        self.train_cnn = train_cnn
        self.cnn_cache: dict[int, torch.Tensor] = {}
        dev = self.device.split(":")[0]
        if amp and dev == "cuda":
            self.autocast = lambda: torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
        else:
            self.autocast = lambda: torch.autocast(dev, enabled=False)

    @torch.no_grad()
    def fill_cnn_cache(self, items: list[_Item], idx: Sequence[int]) -> None:
        """CNN frames of the frozen feature encoder, computed once (length-sorted batches)."""
        todo = sorted({i for i in idx if i not in self.cnn_cache}, key=lambda i: len(items[i].x))
        step = self.enc.cnn_chunk
        for b in range(0, len(todo), step):
            chunk = todo[b : b + step]
            for i, f in zip(chunk, self._cnn_forward(items, chunk)):
                self.cnn_cache[i] = f.float()

    def _cnn_forward(self, items: list[_Item], batch: list[int]) -> list[torch.Tensor]:
        """Each clip's ``(C, frames)`` CNN output, exact as if run alone (padding-exact rules)."""
        return self.enc.cnn_outputs([torch.from_numpy(items[i].x).to(self.device) for i in batch])

    def _cnn(self, items: list[_Item], batch: list[int]) -> list[torch.Tensor]:
        if not self.train_cnn:
            self.fill_cnn_cache(items, batch)
            return [self.cnn_cache[i] for i in batch]
        return self._cnn_forward(items, batch)

    def hidden_states(self, items: list[_Item], batch: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``hidden_states`` of a batch (with gradients where parameters need them) and the bool
        pooling mask ``(B, T_max)`` (each clip's true frames, or its segment's)."""
        from featstore.encoders.hf_ssl import _feature_encoder_swapped

        feats = self._cnn(items, batch)
        frames = [items[i].frames for i in batch]
        t_max = max(frames)
        full = torch.stack([F.pad(f, (0, t_max - t)) for f, t in zip(feats, frames)])
        n_max = max(len(items[i].x) for i in batch)
        sample_mask = torch.zeros(len(batch), n_max, dtype=torch.long)
        pool_mask = torch.zeros(len(batch), t_max, dtype=torch.bool)
        for k, i in enumerate(batch):
            sample_mask[k, : len(items[i].x)] = 1
            a, b = items[i].pool
            pool_mask[k, a:b] = True
        dummy = torch.zeros(len(batch), 1, device=self.device)
        with self.autocast(), _feature_encoder_swapped(self.model, full), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            out = self.model(dummy, attention_mask=sample_mask.to(self.device), output_hidden_states=True)
        return list(out.hidden_states), pool_mask.to(self.device)


# ---------------------------------------------------------------------------------------------


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


def finetune(
    model: str,
    manifest: str | Path | Manifest,
    out: str | Path,
    *,
    unfreeze_top: int = 4,
    freeze_feature_encoder: bool = True,
    head_only_steps: int = 500,
    lr_backbone: float = 1e-5,
    lr_head: float = 1e-3,
    pooling: str = "mean",
    class_weight: str | None = "balanced",
    fold: str | tuple[int, int] | None = None,
    group_column: str = "speaker",
    epochs: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    amp: str | None = None,
    patience: int = 3,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    head_dropout: float = 0.1,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    console: Any = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (alias, hub id or model directory) on the labelled clips of ``manifest``.

    Phase 1 trains the head alone for ``head_only_steps`` steps (lr ``lr_head``); phase 2 trains
    the head and the top ``unfreeze_top`` transformer layers (lr ``lr_backbone``; also the CNN with
    ``freeze_feature_encoder=False``) for up to ``epochs`` epochs, stopping after ``patience``
    epochs without a better validation balanced accuracy (ties: lower validation loss). Validation
    is fold ``K/N`` of a speaker-grouped stratified split (default ``1/5``). The best state
    (phase 1's end counts as epoch 0) is saved in ``out``. Seeded: on CPU the same seed gives the
    same log. ``threads``: torch CPU threads for this call (restored afterwards; ``None`` leaves
    torch's setting) — on a busy machine one thread can be several times faster than two. Raises
    :class:`FinetuneError` for user mistakes.
    """
    if threads is not None and threads < 1:
        raise FinetuneError(f"threads must be >= 1, not {threads}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _finetune(
            model, manifest, out, unfreeze_top=unfreeze_top, freeze_feature_encoder=freeze_feature_encoder,
            head_only_steps=head_only_steps, lr_backbone=lr_backbone, lr_head=lr_head, pooling=pooling,
            class_weight=class_weight, fold=fold, group_column=group_column, epochs=epochs, batch_size=batch_size,
            seed=seed, device=device, amp=amp, patience=patience, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            head_dropout=head_dropout, overwrite=overwrite, progress=progress, console=console)
    finally:
        torch.set_num_threads(previous)


def _finetune(model, manifest, out, *, unfreeze_top, freeze_feature_encoder, head_only_steps, lr_backbone, lr_head,
              pooling, class_weight, fold, group_column, epochs, batch_size, seed, device, amp, patience, weight_decay,
              max_grad_norm, head_dropout, overwrite, progress, console) -> FinetuneResult:
    from rich.console import Console
    from rich.table import Table

    from featstore.encoders.hf_ssl import SSLEncoder
    from featstore.encoders.registry import SSL_MODEL_TYPES, pick_device, resolve_pretrained

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    if pooling not in POOLINGS:
        raise FinetuneError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if class_weight not in (None, "none", "balanced"):
        raise FinetuneError(f"class_weight must be 'balanced' or None, not {class_weight!r}")
    class_weight = None if class_weight == "none" else class_weight
    if amp in ("", "fp32", "none"):
        amp = None
    if amp not in (None, "bf16", "fp16"):
        raise FinetuneError(f"amp must be bf16, fp16 or None, not {amp!r}")
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("head_only_steps", head_only_steps, 0),
                             ("patience", patience, 1), ("unfreeze_top", unfreeze_top, 0)):
        if int(value) < low:
            raise FinetuneError(f"{name} must be >= {low}, not {value}")
    for name, value in (("lr_backbone", lr_backbone), ("lr_head", lr_head)):
        if not value > 0:
            raise FinetuneError(f"{name} must be > 0, not {value}")
    fold_t = parse_fold(fold) if not isinstance(fold, tuple) else fold
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"{out} exists and is not empty: choose another --out or pass --overwrite")

    local, revision = resolve_pretrained(model)
    model_type = json.loads((local / "config.json").read_text()).get("model_type", "")
    if model_type not in SSL_MODEL_TYPES:
        raise FinetuneError(f"model '{model}' has model_type '{model_type}'; finetune supports {', '.join(SSL_MODEL_TYPES)}")
    device = pick_device(device)
    if amp and not device.startswith("cuda"):
        console.print(f"[dim]note: --amp {amp} applies on CUDA only; training in float32 on {device}[/]")
        amp = None
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    man = manifest if isinstance(manifest, Manifest) else read_manifest(manifest, group_column)
    encoder = SSLEncoder(local, name=model, revision=revision, device=device)
    backbone_model = encoder.model
    items, skipped, labels = _load_items(man, encoder, console)
    if len(labels) < 2:
        raise FinetuneError(f"need at least 2 labels to train a classifier, found {len(labels)} "
                            f"({', '.join(labels) or 'none'}) among {len(items)} usable row(s)")
    if not any(it.group for it in items):
        console.print("[yellow]warning:[/] no speaker column: the split is by clip, not by speaker (optimistic scores)")
        for it in items:
            it.group = it.id
    y_all = np.array([it.label for it in items], dtype=np.int64)
    train_idx, val_idx = grouped_split(y_all, [it.group or it.id for it in items], fold_t, seed)
    train_idx, val_idx = [int(i) for i in train_idx], [int(i) for i in val_idx]
    missing = sorted(set(range(len(labels))) - set(y_all[train_idx].tolist()))
    if missing:
        raise FinetuneError(f"the training split holds no clip of {', '.join(labels[i] for i in missing)}: "
                            f"use another --fold or --seed, or more speakers")
    frames = [it.frames for it in items]
    equal_frames = not encoder.mask_exact

    # parameter groups -------------------------------------------------------------------------
    groups = backbone_parameter_groups(backbone_model, unfreeze_top, freeze_feature_encoder)
    for p in backbone_model.parameters():
        p.requires_grad_(False)
    cfg = backbone_model.config
    head = ClassifierHead(cfg.hidden_size, len(labels), pooling, cfg.num_hidden_layers + 1, head_dropout).to(device)
    head_params = list(head.parameters())
    back_train = groups["top"] + groups["cnn"]
    n_top_layers = min(unfreeze_top, cfg.num_hidden_layers)
    table_rows = [
        {"group": "head", "tensors": len(head_params), "params": sum(p.numel() for p in head_params),
         "trainable": True, "lr": lr_head, "phase": "1-2"},
        {"group": f"backbone top {n_top_layers} layer(s)", "tensors": len(groups["top"]),
         "params": sum(p.numel() for _, p in groups["top"]), "trainable": bool(groups["top"]), "lr": lr_backbone if groups["top"] else None, "phase": "2" if groups["top"] else "-"},
        {"group": "feature encoder (CNN)", "tensors": len(groups["cnn"]) or sum(1 for n, _ in groups["frozen"] if n.startswith("feature_extractor.")),
         "params": sum(p.numel() for n, p in backbone_model.named_parameters() if n.startswith("feature_extractor.")),
         "trainable": bool(groups["cnn"]), "lr": lr_backbone if groups["cnn"] else None, "phase": "2" if groups["cnn"] else "-"},
        {"group": "frozen rest (lower layers, projection, ...)", "tensors": sum(1 for n, _ in groups["frozen"] if not n.startswith("feature_extractor.")),
         "params": sum(p.numel() for n, p in groups["frozen"] if not n.startswith("feature_extractor.")),
         "trainable": False, "lr": None, "phase": "-"},
    ]
    t = Table(title=f"finetune {model}: parameters")
    for col in ("group", "tensors", "parameters", "trainable", "lr", "phase"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for r in table_rows:
        t.add_row(r["group"], str(r["tensors"]), f"{r['params']:,}", "yes" if r["trainable"] else "no",
                  f"{r['lr']:.0e}" if r["lr"] else "-", r["phase"])
    console.print(t)
    console.print(f"train {len(train_idx)} clips ({len({items[i].group for i in train_idx})} speakers), "
                  f"validation {len(val_idx)} clips ({len({items[i].group for i in val_idx})} speakers), "
                  f"labels {', '.join(labels)}, device {device}")
    frozen_before = {n: _digest(p) for n, p in groups["frozen"]}
    trainable_before = {n: _digest(p) for n, p in back_train}

    counts = np.bincount(y_all[train_idx], minlength=len(labels)).astype(np.float64)
    weight = None
    if class_weight == "balanced":
        weight = torch.tensor(len(train_idx) / (len(labels) * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    y_t = torch.from_numpy(y_all)
    bb = _Backbone(encoder, train_cnn=bool(groups["cnn"]), amp=amp)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    timing: dict[str, Any] = {"epoch_seconds": [], "epoch_cpu_seconds": []}

    def summaries(idx: list[int]) -> dict[int, torch.Tensor]:
        backbone_model.eval()
        cache: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for batch in _eval_batches(idx, frames, 2 * batch_size, equal_frames):
                hs, pm = bb.hidden_states(items, batch)
                for i, piece in zip(batch, _split_summary(pooling, head.summarize(hs, pm), pm)):
                    cache[i] = piece
        return cache

    def evaluate_cached(cache: dict[int, torch.Tensor], idx: list[int]) -> dict[str, float]:
        head.eval()
        logits = []
        with torch.no_grad():
            for s in range(0, len(idx), 4 * batch_size):
                part = idx[s:s + 4 * batch_size]
                summ, mask = _collate(pooling, [cache[i] for i in part], device)
                logits.append(head(summ, mask).float().cpu())
        return _metrics(y_all[idx], torch.cat(logits).numpy(), weight)

    def step(loss: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()

    def cached_batches(idx: list[int]) -> Iterator[list[int]]:
        while True:
            perm = [int(i) for i in rng.permutation(np.asarray(idx))]
            for s in range(0, len(perm), batch_size):
                yield perm[s:s + batch_size]

    # the fused AdamW kernel: ~5x faster than the for-each one on CPU for a base model's top layers
    head_group = [{"params": head_params, "lr": lr_head, "weight_decay": weight_decay, "name": "head"}]
    try:
        opt = torch.optim.AdamW(head_group, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        opt = torch.optim.AdamW(head_group)
    history: list[dict[str, Any]] = []
    head_losses: list[float] = []
    best: dict[str, Any] = {"epoch": -1, "val_balanced_accuracy": -1.0, "val_loss": float("inf")}
    best_state: dict[str, Any] = {}
    interrupted = stopped_early = False

    def consider(record: dict[str, Any]) -> bool:
        better = (record["val_balanced_accuracy"] > best["val_balanced_accuracy"] or
                  (record["val_balanced_accuracy"] == best["val_balanced_accuracy"] and record["val_loss"] < best["val_loss"]))
        if better:
            best.update(epoch=record["epoch"], val_balanced_accuracy=record["val_balanced_accuracy"], val_loss=record["val_loss"])
            best_state["head"] = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
            best_state["backbone"] = {n: p.detach().cpu().clone() for n, p in back_train}
        return better

    def report(record: dict[str, Any], seconds: float, is_best: bool) -> None:
        name = "head only" if record["phase"] == "head" else f"epoch {record['epoch']}"
        console.print(f"{name:>10}  train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}  "
                      f"val bal.acc {record['val_balanced_accuracy']:.3f}  acc {record['val_accuracy']:.3f}  "
                      f"{seconds:.1f} s" + ("  [green]* best[/]" if is_best else ""))

    try:
        # phase 1: the head on cached pooled inputs of the frozen backbone ---------------------
        t0 = time.perf_counter()
        need_cache = head_only_steps > 0 or not back_train
        train_cache = val_cache = None
        if need_cache:
            train_cache, val_cache = summaries(train_idx), summaries(val_idx)
        elif not bb.train_cnn:
            bb.fill_cnn_cache(items, train_idx + val_idx)
        timing["cache_seconds"] = round(time.perf_counter() - t0, 3)
        if head_only_steps > 0:
            t0 = time.perf_counter()
            head.train()
            batches = cached_batches(train_idx)
            with _progress(console, progress) as bar:
                task = bar.add_task("head only", total=head_only_steps, loss="-")
                for _ in range(head_only_steps):
                    batch = next(batches)
                    summ, mask = _collate(pooling, [train_cache[i] for i in batch], device)
                    loss = loss_fn(head(summ, mask).float(), y_t[batch].to(device))
                    step(loss, head_params, opt)
                    head_losses.append(round(float(loss.item()), 6))
                    bar.update(task, advance=1, loss=f"{loss.item():.4f}")
            per_epoch = max(1, -(-len(train_idx) // batch_size))
            record = {"epoch": 0, "phase": "head", "steps": head_only_steps,
                      "train_loss": round(float(np.mean(head_losses[-per_epoch:])), 6), **evaluate_cached(val_cache, val_idx)}
            history.append(record)
            timing["head_phase_seconds"] = round(time.perf_counter() - t0, 3)
            report(record, timing["head_phase_seconds"], consider(record))

        # phase 2: head + unfrozen top layers ----------------------------------------------------
        if back_train:
            for _, p in back_train:
                p.requires_grad_(True)
            opt.add_param_group({"params": [p for _, p in back_train], "lr": lr_backbone, "weight_decay": weight_decay, "name": "backbone"})
        all_params = head_params + [p for _, p in back_train]
        since_best = 0
        for epoch in range(1, epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            head.train()
            backbone_model.eval()
            for i in range(cfg.num_hidden_layers - n_top_layers, cfg.num_hidden_layers):
                backbone_model.encoder.layers[i].train()
            losses = []
            if back_train:
                batches = _train_batches(train_idx, frames, batch_size, rng, equal_frames)
            else:
                batches = [[int(i) for i in rng.permutation(np.asarray(train_idx))[s:s + batch_size]]
                           for s in range(0, len(train_idx), batch_size)]
            with _progress(console, progress) as bar:
                task = bar.add_task(f"epoch {epoch}/{epochs}", total=len(batches), loss="-")
                for batch in batches:
                    if back_train:
                        hs, pm = bb.hidden_states(items, batch)
                        with bb.autocast():
                            logits = head(head.summarize(hs, pm), pm)
                    else:
                        summ, mask = _collate(pooling, [train_cache[i] for i in batch], device)
                        logits = head(summ, mask)
                    loss = loss_fn(logits.float(), y_t[batch].to(device))
                    step(loss, all_params, opt)
                    losses.append(float(loss.item()))
                    bar.update(task, advance=1, loss=f"{np.mean(losses):.4f}")
            if back_train:
                val_cache = summaries(val_idx)
            record = {"epoch": epoch, "phase": "head+top" if back_train else "head", "steps": len(batches),
                      "train_loss": round(float(np.mean(losses)), 6), **evaluate_cached(val_cache, val_idx)}
            history.append(record)
            seconds = time.perf_counter() - t0
            timing["epoch_seconds"].append(round(seconds, 3))
            timing["epoch_cpu_seconds"].append(round(time.process_time() - c0, 3))
            is_best = consider(record)
            report(record, seconds, is_best)
            since_best = 0 if is_best else since_best + 1
            if since_best >= patience and epoch < epochs:
                stopped_early = True
                console.print(f"[dim]early stop: no better validation balanced accuracy for {patience} epoch(s)[/]")
                break
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted[/]: saving the best state so far")
    backbone_model.eval()
    head.eval()
    if not best_state:
        raise FinetuneError("nothing was trained (head_only_steps=0 and epochs=0, or interrupted at once)")

    # restore the best state, verify the frozen parts, save ---------------------------------------
    head.load_state_dict(best_state["head"])
    with torch.no_grad():
        for n, p in back_train:
            p.copy_(best_state["backbone"][n].to(p.device))
    for p in backbone_model.parameters():
        p.requires_grad_(False)
    changed_frozen = [n for n, p in groups["frozen"] if _digest(p) != frozen_before[n]]
    trainable_changed = sum(_digest(p) != trainable_before[n] for n, p in back_train)
    frozen_check = {"frozen_tensors": len(frozen_before), "frozen_params": sum(p.numel() for _, p in groups["frozen"]),
                    "unchanged": not changed_frozen, "changed": changed_frozen,
                    "trainable_tensors": len(back_train), "trainable_tensors_changed": int(trainable_changed)}
    if changed_frozen:
        console.print(f"[bold red]frozen parameters changed:[/] {', '.join(changed_frozen[:5])}")
    else:
        console.print(f"[green]✓[/] {len(frozen_before)} frozen tensors ({frozen_check['frozen_params']:,} parameters) "
                      f"bit-identical after training; {trainable_changed}/{len(back_train)} unfrozen tensors changed")
    if best["epoch"] == 0 and back_train:
        console.print("[yellow]note:[/] the best state is the head-only phase: the saved backbone equals the pre-trained one")

    out.mkdir(parents=True, exist_ok=True)
    backbone_model.save_pretrained(out)
    encoder.feature_extractor.save_pretrained(out)
    torch.save(head.state_dict(), out / HEAD_WEIGHTS)
    head_cfg = {"labels": labels, "pooling": pooling, "hidden_size": int(cfg.hidden_size),
                "num_hidden_states": int(cfg.num_hidden_layers + 1), "dropout": head_dropout,
                "layer_weights": head.layer_weights(), "base_model": model, "base_revision": revision,
                "best_epoch": best["epoch"], "val_balanced_accuracy": best["val_balanced_accuracy"]}
    (out / HEAD_CONFIG).write_text(json.dumps(head_cfg, indent=2))
    _write_rows(out / VALIDATION_MANIFEST, man, {items[i].id for i in val_idx}, group_column)
    seconds = time.perf_counter() - t_start
    timing["total_seconds"] = round(seconds, 3)
    log = {
        "format": "featstore-finetune", "version": 1,
        "config": {"model": model, "revision": revision, "manifest": str(man.source), "manifest_sha256": man.sha256,
                   "unfreeze_top": unfreeze_top, "freeze_feature_encoder": freeze_feature_encoder,
                   "head_only_steps": head_only_steps, "lr_backbone": lr_backbone, "lr_head": lr_head, "pooling": pooling,
                   "class_weight": class_weight, "fold": f"{fold_t[0]}/{fold_t[1]}" if fold_t else None,
                   "group_column": group_column, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                   "device": device, "amp": amp, "patience": patience, "weight_decay": weight_decay,
                   "max_grad_norm": max_grad_norm, "head_dropout": head_dropout},
        "labels": labels,
        "class_weights": weight.tolist() if weight is not None else None,
        "split": {"train": len(train_idx), "val": len(val_idx),
                  "train_groups": sorted({items[i].group for i in train_idx}),
                  "val_groups": sorted({items[i].group for i in val_idx}),
                  "val_ids": [items[i].id for i in val_idx]},
        "skipped": [{"id": i, "status": s, "error": e} for i, s, e in skipped],
        "param_groups": table_rows,
        "head_phase": {"steps": head_only_steps, "loss": head_losses},
        "epochs": history,
        "best": best,
        "stopped_early": stopped_early,
        "interrupted": interrupted,
        "frozen_check": frozen_check,
        "layer_weights": head.layer_weights(),
        "timing": timing,
    }
    (out / LOG_NAME).write_text(json.dumps(log, indent=2))
    console.print(f"best epoch {best['epoch']}: val bal.acc {best['val_balanced_accuracy']:.3f} -> saved {out}")
    return FinetuneResult(
        out=out, labels=labels, best_epoch=best["epoch"], best_val_balanced_accuracy=best["val_balanced_accuracy"],
        history=history, head_losses=head_losses, param_groups=table_rows, frozen_unchanged=not changed_frozen,
        trainable_changed=int(trainable_changed), n_train=len(train_idx), n_val=len(val_idx), skipped=skipped,
        stopped_early=stopped_early, interrupted=interrupted, seconds=seconds,
    )

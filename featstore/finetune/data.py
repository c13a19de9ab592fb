"""Fine-tuning data: the usable rows of a manifest as decoded clips, length-aware batches, the
validation rows written back as a manifest."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featstore.audio import AudioError, load_audio
from featstore.finetune.errors import FinetuneError
from featstore.manifest import Manifest

#: the validation rows (absolute paths): extract these to compare held-out speakers before/after
VALIDATION_MANIFEST = "validation.csv"


@dataclass
class Item:
    """One usable clip: what the backbone takes (``x``), its label code, speaker and frames."""

    id: str
    x: np.ndarray  # the backbone's input samples (after its per-clip preprocessing)
    label: int
    group: str
    frames: int
    pool: tuple[int, int]  # frames pooled over, [a, b)


def parse_fold(spec: str | None) -> tuple[int, int] | None:
    """``"1/5"`` -> ``(1, 5)`` (validation = fold K of N); ``None`` -> ``None``."""
    if spec is None or str(spec).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or int(m[2]) < 2 or not 1 <= int(m[1]) <= int(m[2]):
        raise FinetuneError(f"bad fold {spec!r}: use K/N with 1 <= K <= N and N >= 2, e.g. --fold 1/5")
    return int(m[1]), int(m[2])


def load_items(man: Manifest, backbone: Any, console: Any) -> tuple[list[Item], list[tuple[str, str, str]], list[str]]:
    """Decode every labelled row; rows that cannot be used are skipped with a status and a message.

    Returns ``(items, skipped, labels)``: ``skipped`` holds ``(id, status, message)``, ``labels``
    the sorted label names (``Item.label`` indexes them).
    """
    from featstore.extract import segment_frames

    encoder = backbone.encoder
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
        n_samples = len(clip.samples)
        n = encoder.num_frames(n_samples)
        if n == 0:
            skipped.append((row.id, "too_short", f"{n_samples / clip.sample_rate:.3f} s is shorter than one frame "
                                                 f"({encoder.min_samples()} samples)"))
            continue
        limit = backbone.max_samples
        if limit and n_samples > limit:
            skipped.append((row.id, "too_long", f"{n_samples / clip.sample_rate:.2f} s is longer than the model's window "
                                                f"({limit / clip.sample_rate:.2f} s): raise --context-seconds or cut the clip"))
            continue
        pool = (0, n)
        if row.start is not None:
            pool = segment_frames(encoder, n, row.start, row.end)
            if pool[1] <= pool[0]:
                skipped.append((row.id, "bad_segment", f"segment [{row.start:.3f}, {row.end:.3f}) s covers no frame"))
                continue
        kept.append((row, backbone.prepare_input(clip.samples), n, pool))
    labels = sorted({r.label for r, *_ in kept})
    index = {lab: i for i, lab in enumerate(labels)}
    items = [Item(r.id, x, index[r.label], r.group, n, pool) for r, x, n, pool in kept]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} row(s):[/]")
        for i, (item, status, msg) in enumerate(skipped):
            if i == 20:
                console.print(f"  ... and {len(skipped) - 20} more (see log.json)")
                break
            console.print(f"  {item}: [bold]{status}[/] {msg}")
    return items, skipped, labels


def write_rows(path: Path, man: Manifest, ids: set[str], group_column: str) -> None:
    """The manifest rows with these ids (absolute paths), as a manifest ``featstore extract`` reads."""
    rows = [r for r in man.rows if r.id in ids and not r.status]
    segments = any(r.start is not None for r in rows)
    cols = ["id", "path", "label", group_column] + (["start", "end"] if segments else []) + list(man.extra_columns)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            seg = [r.start if r.start is not None else "", r.end if r.end is not None else ""] if segments else []
            w.writerow([r.id, str(Path(r.path).resolve()), r.label, r.group] + seg + [r.extra.get(c, "") for c in man.extra_columns])


def eval_batches(idx: Sequence[int], frames: Sequence[int], batch_size: int, equal_frames: bool) -> list[list[int]]:
    """Length-sorted batches (no shuffling) for evaluation and caching."""
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


def train_batches(idx: Sequence[int], frames: Sequence[int], batch_size: int, rng: np.random.Generator,
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


def shuffled_batches(idx: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """One epoch of random batches (cached inputs: length does not matter)."""
    perm = [int(i) for i in rng.permutation(np.asarray(idx))]
    return [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]

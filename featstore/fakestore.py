"""Synthetic stores with known structure, for tests and sweep benchmarks (no model needed).

``write_fake_store`` writes a valid format-1 store whose frames carry a *local* label cue (a few
frames around the centre of each item, or of its segment) in chosen layers, a speaker offset in
every layer, and noise elsewhere. Each speaker has one label, as in clinical sigmatism data.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from featstore.store import StoreWriter

DEFAULT_CLASSES = ("Normal", "Lateral", "Interdental")
DEFAULT_PROBS = (0.25, 0.55, 0.20)


def write_fake_store(
    path: str | Path,
    n_speakers: int = 30,
    items_per_speaker: int = 10,
    num_layers: int = 4,
    dim: int = 16,
    informative_layers: Sequence[int] = (2,),
    cue_strength: float = 1.5,
    speaker_strength: float = 1.0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    class_probs: Sequence[float] = DEFAULT_PROBS,
    frames_range: tuple[int, int] = (4, 12),
    with_segments: bool = False,
    seed: int = 0,
) -> Path:
    """Write a fake store; returns its path. Items are ordered speaker by speaker."""
    rng = np.random.default_rng(seed)
    n_classes = len(classes)
    speaker_label = rng.choice(n_classes, size=n_speakers, p=np.asarray(class_probs) / np.sum(class_probs))
    # make sure every class has at least two speakers
    for c in range(n_classes):
        if (speaker_label == c).sum() < 2:
            speaker_label[rng.choice(n_speakers, 2, replace=False)] = c
    class_dirs = rng.normal(size=(num_layers, n_classes, dim))
    speaker_dirs = rng.normal(size=(num_layers, n_speakers, dim))
    rows, frames = [], []
    for s in range(n_speakers):
        for j in range(items_per_speaker):
            y = int(speaker_label[s])
            t = int(rng.integers(frames_range[0], frames_range[1] + 1))
            x = rng.normal(size=(num_layers, t, dim)).astype(np.float32)
            x += speaker_strength * speaker_dirs[:, s, None, :]
            if with_segments:
                seg_len = max(1, t // 3)
                start = int(rng.integers(0, t - seg_len + 1))
                end = start + seg_len
            else:
                start, end = -1, -1
            lo, hi = (start, end) if with_segments else (max(0, t // 2 - 1), min(t, t // 2 + 1))
            for k in informative_layers:
                x[k, lo:hi] += cue_strength * class_dirs[k, y]
            rows.append({
                "id": f"spk{s:03d}_{j:03d}", "path": f"fake/spk{s:03d}_{j:03d}.wav",
                "label": classes[y], "group": f"spk{s:03d}", "num_samples": 320 * t + 80,
                "segment_start_frame": start, "segment_end_frame": end,
                "sha256": hashlib.sha256(x.tobytes()).hexdigest(), "rms_db": float(-20 - rng.random() * 10),
                "sex": "F" if s % 2 else "M",
            })
            frames.append([x[k] for k in range(num_layers)])
    attrs = {
        "encoder": "fake", "encoder_revision": "", "encoder_config": {"seed": seed},
        "sample_rate": 16000, "frame_stride_samples": 320, "receptive_field_samples": 400,
        "first_frame_center_samples": 200.0, "manifest_sha256": "", "padding_exact": True,
        "padding_audit": {}, "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": json.dumps({"featstore": "fake"}),
    }
    writer = StoreWriter.create(path, rows, attrs, [dim] * num_layers, extra_columns=["sex"], durable=False)
    batch = 64
    for b in range(0, len(rows), batch):
        writer.write_items([(i, {}, frames[i]) for i in range(b, min(len(rows), b + batch))])
    return writer.finalize()

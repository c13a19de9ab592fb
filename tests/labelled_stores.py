"""Small stores for the figure and report tests: chosen layer ids, and the root attributes that
mark a random-init control or a common-recipe (padded) store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from featstore.store import StoreWriter

CONTROL = {"control": "random-init", "random_init_seed": 7}
PADDED = {"padding_exact": False,
          "padding_recipe": json.dumps({"pad_seconds": 1.0, "keep_padding": False, "attention_mask": True,
                                        "truncated": 0})}
CREATED = "2026-11-30T12:00:00+00:00"
MANIFEST = "9" * 64


def write_store(path: Path, layer_ids: Sequence[int], attrs: Mapping | None = None, n_speakers: int = 18,
                per_speaker: int = 4, dim: int = 6, cue: Mapping[int, float] | None = None, seed: int = 0) -> Path:
    """A store holding ``layer_ids``: three classes, one per speaker; the label cue grows with the
    layer's position (``cue`` maps layer id -> strength to override), plus a speaker offset."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    lab = np.arange(n_speakers) % 3
    n = len(layer_ids)
    cue = dict(cue) if cue is not None else {k: 1.2 * i / max(1, n - 1) + 0.4 for i, k in enumerate(layer_ids)}
    cls_dir = rng.normal(size=(n, 3, dim))
    spk_dir = rng.normal(size=(n, n_speakers, dim))
    rows, frames = [], []
    for s in range(n_speakers):
        for j in range(per_speaker):
            t = int(rng.integers(3, 7))
            x = rng.normal(size=(n, t, dim)).astype(np.float32) + 0.5 * spk_dir[:, s, None, :]
            for i, k in enumerate(layer_ids):
                x[i] += cue.get(k, 0.0) * cls_dir[i, lab[s]]
            rows.append({"id": f"s{s:02d}_{j}", "path": f"s{s:02d}_{j}.wav", "label": classes[lab[s]],
                         "group": f"s{s:02d}", "num_samples": 320 * t + 80})
            frames.append([x[i] for i in range(n)])
    base = {"encoder": "tiny-encoder", "encoder_revision": "rev-0123abcd", "encoder_config": {},
            "sample_rate": 16000, "frame_stride_samples": 320, "receptive_field_samples": 400,
            "first_frame_center_samples": 200.0, "manifest_sha256": MANIFEST, "padding_exact": True,
            "padding_audit": {}, "created_at": CREATED,
            "versions": json.dumps({"featstore": "0.test", "torch": "2.13.0"})}
    base.update(attrs or {})
    w = StoreWriter.create(path, rows, base, [dim] * n, layer_ids=list(layer_ids))
    w.write_items([(i, {}, frames[i]) for i in range(len(rows))])
    return w.finalize()

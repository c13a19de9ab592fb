"""A PyTorch ``Dataset`` and ``collate`` over a store: an item's true frames, never padding.

```python
from torch.utils.data import DataLoader
from featstore.torchdata import FrameDataset, collate_frames

ds = FrameDataset("cache/wavlm-base-plus__clips.h5", layers=6, scope="segment")
loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, collate_fn=collate_frames)
for batch in loader:
    batch["frames"]   # (B, T_max, dim) float32, zero after each item's length
    batch["lengths"]  # (B,) true frame counts;  batch["mask"]: (B, T_max) bool, True on real frames
    batch["labels"]   # (B,) int64 indices into ds.labels (fixed order, -1 = unlabelled)
```

* ``layers``: one stored layer (an int: the model layer id as in ``layers/NN``; negative counts
  from the last stored layer) gives ``(T, dim)`` per item; a list of layers or ``"all"`` gives the
  layers stacked, ``(L, T, dim)`` per item and ``(B, L, T_max, dim)`` per batch (all must have one
  width).
* ``scope``: ``clip`` (all the item's frames), ``segment`` (its segment's frames; an error when an
  item has no segment; an empty segment becomes the clip's centre frame, with a warning), ``auto``
  (segment when the store has segments) — the same spans the probes pool over
  (:mod:`featstore.spans`).
* Items are **skipped** when their status is not ``ok`` (failed extraction, 0 frames), when they
  have no label (unless ``keep_unlabelled=True``: label -1) or a label outside a given ``labels``
  list, or when they are not in ``rows`` (indices or a boolean mask; items stay in store order);
  ``ds.skipped`` lists ``(id, reason)`` (rows left out by ``rows`` are not listed).
* Labels are encoded in a fixed order: ``labels=[...]`` or, by default, the sorted labels of the
  items kept; ``ds.labels`` is that order (save it with the model).
* DataLoader workers: the HDF5 file is opened lazily, once per process, on the first item that
  process reads (the handle is dropped when the dataset is pickled for a spawned worker and
  reopened after a fork), so no handle is ever shared between processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from featstore.spans import item_spans, resolve_scope
from featstore.store import OK, layer_name, open_store


class FrameDataset(Dataset):
    """Items of a store as frame tensors (see the module docstring)."""

    def __init__(
        self,
        store: str | os.PathLike,
        layers: int | Sequence[int] | str = -1,
        scope: str = "clip",
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        keep_unlabelled: bool = False,
        rows: Sequence[int] | np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.path = Path(store)
        self.dtype = dtype
        with open_store(self.path) as st:
            stored = st.layer_ids
            self.layer_ids, self.stacked = _pick_layers(layers, stored)
            dims = sorted({st.layer_dim(k) for k in self.layer_ids})
            if len(dims) > 1:
                raise ValueError(f"layers {self.layer_ids} have different widths {dims}: stack layers of one width, "
                                 "or take one layer at a time")
            self.dim = dims[0]
            self.scope = resolve_scope(st, scope)
            start, stop = item_spans(st, self.scope)
            if label_column not in st.h5["items"]:
                raise ValueError(f"{self.path} has no items/{label_column} column "
                                 f"(columns: {', '.join(st.h5['items'].keys())})")
            ids, status, label_str, group = ([str(v) for v in st.column(c)] for c in ("id", "status", label_column, "group"))
        chosen = np.ones(len(ids), dtype=bool)
        if rows is not None:  # row indices or a boolean mask over the store's rows
            sel = np.asarray(rows)
            if sel.dtype == bool:
                if sel.shape != (len(ids),):
                    raise ValueError(f"a boolean rows mask must have shape ({len(ids)},), got {sel.shape}")
                chosen = sel.copy()
            else:
                chosen = np.zeros(len(ids), dtype=bool)
                chosen[sel.astype(np.int64)] = True
        known = None if labels is None else list(labels)
        keep, skipped = [], []
        for i in range(len(ids)):
            if not chosen[i]:
                continue
            if status[i] != OK or stop[i] <= start[i]:
                skipped.append((ids[i], f"status {status[i]}" if status[i] != OK else "no frames"))
            elif not label_str[i] and not keep_unlabelled:
                skipped.append((ids[i], "unlabelled"))
            elif label_str[i] and known is not None and label_str[i] not in known:
                skipped.append((ids[i], f"label {label_str[i]!r} not in labels"))
            else:
                keep.append(i)
        self.rows = np.asarray(keep, dtype=np.int64)
        self.labels: list[str] = known if known is not None else sorted({label_str[i] for i in keep if label_str[i]})
        index = {lab: k for k, lab in enumerate(self.labels)}
        self.label_index = index
        self.ids = [ids[i] for i in keep]
        self.groups = [group[i] for i in keep]
        self.targets = np.array([index.get(label_str[i], -1) for i in keep], dtype=np.int64)
        self.starts, self.stops = start[self.rows], stop[self.rows]
        self.skipped = skipped
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    # -- one handle per process ----------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            # a handle inherited through fork belongs to the parent: never use it here
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid() and self._h5.id.valid:
            self._h5.close()
        self._h5, self._pid = None, None

    # -- Dataset ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def frames(self, i: int) -> np.ndarray:
        """Item ``i``'s frames as stored: ``(T, dim)``, or ``(L, T, dim)`` for stacked layers."""
        layers = self._file()["layers"]
        a, b = int(self.starts[i]), int(self.stops[i])
        per_layer = [layers[layer_name(k)][a:b] for k in self.layer_ids]
        return np.stack(per_layer) if self.stacked else per_layer[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i = i % len(self)
        x = torch.from_numpy(np.ascontiguousarray(self.frames(i))).to(self.dtype)
        return {"frames": x, "length": int(self.stops[i] - self.starts[i]), "label": int(self.targets[i]),
                "id": self.ids[i], "group": self.groups[i], "row": int(self.rows[i])}

    def __repr__(self) -> str:
        return (f"FrameDataset({str(self.path)!r}, layers={self.layer_ids if self.stacked else self.layer_ids[0]}, "
                f"scope={self.scope!r}, items={len(self)}, skipped={len(self.skipped)}, labels={self.labels})")


def _pick_layers(layers: int | Sequence[int] | str, stored: list[int]) -> tuple[list[int], bool]:
    def one(k: int) -> int:
        if k < 0:
            if -k > len(stored):
                raise ValueError(f"layer {k}: the store has only {len(stored)} layers ({stored})")
            return stored[k]
        if k not in stored:
            raise ValueError(f"layer {k} is not in the store (stored layers: {stored})")
        return k

    if isinstance(layers, str):
        if layers.strip().lower() != "all":
            raise ValueError(f"layers must be an int, a list of ints or 'all', not {layers!r}")
        return list(stored), True
    if isinstance(layers, (int, np.integer)):
        return [one(int(layers))], False
    chosen = [one(int(k)) for k in layers]
    if not chosen:
        raise ValueError("layers is empty")
    return chosen, True


def collate_frames(batch: list[dict[str, Any]], pad_value: float = 0.0) -> dict[str, Any]:
    """Pad a list of :class:`FrameDataset` items into one batch.

    ``frames``: ``(B, T_max, dim)`` (or ``(B, L, T_max, dim)``), ``pad_value`` after each item's
    length; ``lengths``: ``(B,)`` int64; ``mask``: ``(B, T_max)`` bool, True on real frames;
    ``labels``: ``(B,)`` int64; ``rows``: ``(B,)`` int64 store rows; ``ids``, ``groups``: lists.
    Any other key an item carries is gathered into a list.
    """
    lengths = torch.tensor([b["length"] for b in batch], dtype=torch.int64)
    t_max = int(lengths.max()) if len(batch) else 0
    first = batch[0]["frames"]
    shape = (len(batch), *first.shape[:-2], t_max, first.shape[-1])
    frames = torch.full(shape, pad_value, dtype=first.dtype)
    for j, b in enumerate(batch):
        frames[j, ..., : b["length"], :] = b["frames"]
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    out: dict[str, Any] = {
        "frames": frames, "lengths": lengths, "mask": mask,
        "labels": torch.tensor([b["label"] for b in batch], dtype=torch.int64),
        "rows": torch.tensor([b["row"] for b in batch], dtype=torch.int64),
        "ids": [b["id"] for b in batch], "groups": [b["group"] for b in batch],
    }
    for key in batch[0]:
        if key not in ("frames", "length", "label", "row", "id", "group"):
            out[key] = [b[key] for b in batch]
    return out

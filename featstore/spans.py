"""An item's *span* in a store: the frame rows it owns (scope ``clip``) or its segment's frame rows
(scope ``segment``), computed from the ``items/`` table (``offset``, ``num_frames``,
``segment_start_frame``, ``segment_end_frame``). Everything that reads an item's frames (the probes'
pooling, :mod:`featstore.torchdata`) takes its spans from here, so padding and neighbours' frames
are never read.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from featstore.store import Store

SCOPES = ("auto", "clip", "segment")


def resolve_scope(store: Store, scope: str) -> str:
    """``auto`` -> ``segment`` when any item of the store has a segment, else ``clip``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope != "auto":
        return scope
    return "segment" if bool((store.column("segment_start_frame") >= 0).any()) else "clip"


def describe_rows(store: Store, mask: np.ndarray, n: int = 3) -> str:
    """The first ``n`` ids of the rows in ``mask`` ("a, b, c and 4 more"), for messages."""
    ids = store.column("id")[np.flatnonzero(mask)[:n]]
    more = int(mask.sum()) - len(ids)
    return ", ".join(map(str, ids)) + (f" and {more} more" if more > 0 else "")


def item_spans(store: Store, scope: str, return_fallback: bool = False) -> Any:
    """Per item ``(start, stop)`` frame indices into the layer arrays (half-open).

    ``clip``: ``[offset, offset + num_frames)``; ``segment``: ``[offset + segment_start_frame,
    offset + segment_end_frame)``; ``auto``: see :func:`resolve_scope`. Items without frames get an
    empty span. An empty segment (start == end) falls back to the clip's centre frame, with a
    warning that counts them; ``return_fallback=True`` also returns that boolean mask.
    """
    scope = resolve_scope(store, scope)
    offset = store.column("offset").astype(np.int64)
    nfr = store.column("num_frames").astype(np.int64)
    start, stop = offset.copy(), offset + nfr
    fallback = np.zeros(len(offset), dtype=bool)
    live = nfr > 0
    if scope == "segment":
        seg_s = store.column("segment_start_frame").astype(np.int64)
        seg_e = store.column("segment_end_frame").astype(np.int64)
        missing = live & ((seg_s < 0) | (seg_e < 0))
        if missing.any():
            raise ValueError(
                f"scope 'segment': {int(missing.sum())} of {int(live.sum())} items with frames have no "
                f"segment ({describe_rows(store, missing)}); pool them with scope 'clip'"
            )
        bad = live & ((seg_e < seg_s) | (seg_e > nfr))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} items have a segment outside their frames ({describe_rows(store, bad)}); "
                "run `featstore check` on the store"
            )
        start = np.where(live, offset + seg_s, offset)
        stop = np.where(live, offset + seg_e, offset)
        fallback = live & (seg_e == seg_s)
        if fallback.any():
            centre = offset[fallback] + (nfr[fallback] - 1) // 2
            start[fallback], stop[fallback] = centre, centre + 1
            warnings.warn(
                f"{int(fallback.sum())} items have an empty segment ({describe_rows(store, fallback)}); "
                "they are pooled over their clip's centre frame",
                stacklevel=2,
            )
    return (start, stop, fallback) if return_fallback else (start, stop)

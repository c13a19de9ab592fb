"""Join shard stores (``featstore extract --shard K/N``) into one store, in manifest order."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from featstore.store import ITEM_COLUMNS, StoreWriter, open_store
from featstore.writelock import WriterLock

#: attributes every shard of one extraction shares; beside them, every key of the run identity a
#: shard lists (``identity_keys``, written by ``featstore extract``) is compared
IDENTITY = ("encoder", "encoder_revision", "encoder_config", "manifest_sha256", "dtype", "layer_ids",
            "crop_to_segment", "sample_rate", "frame_stride_samples", "group_column", "amp",
            "whisper_window_mode", "whisper_window_seconds", "whisper_context_seconds",
            "padding_exact", "padding_emulation", "control", "random_init_seed")
#: identity keys that differ from shard to shard by design
PER_SHARD = ("shard", "shard_rows", "rows_digest")


def _identity_keys(attrs) -> list[str]:
    return [k for k in (*IDENTITY, *(attrs.get("identity_keys") or ())) if k not in PER_SHARD]


class MergeError(ValueError):
    """Shards that do not belong together, or an incomplete set."""


def merge_shards(shards: Sequence[str | Path], out: str | Path, chunk_items: int = 256) -> Path:
    """Merge shard files into ``out``; items in manifest order, equal to a single-run store.

    Refuses shards of different models/configs/manifests, duplicates, and incomplete sets. The
    merged file is built aside and moved into place only when complete; one merge at a time.
    """
    with WriterLock(out, "featstore merge"):
        return _merge(shards, Path(out), chunk_items)


def _merge(shards: Sequence[str | Path], out: Path, chunk_items: int) -> Path:
    stores = []
    try:
        stores += [open_store(p) for p in shards]
        first = stores[0].attrs
        keys = list(dict.fromkeys(k for s in stores for k in _identity_keys(s.attrs)))
        specs = []
        for s in stores:
            a = s.attrs
            for key in keys:
                if a.get(key) != first.get(key):
                    raise MergeError(f"{s.path.name} differs from {stores[0].path.name} in {key}: "
                                     f"{str(a.get(key))[:60]!r} vs {str(first.get(key))[:60]!r}")
            if not a.get("shard"):
                raise MergeError(f"{s.path.name} is not a shard (no 'shard' attribute)")
            specs.append(tuple(int(v) for v in str(a["shard"]).split("/")))
        n = {b for _, b in specs}
        ks = sorted(k for k, _ in specs)
        if len(n) != 1 or ks != list(range(1, next(iter(n)) + 1)):
            raise MergeError(f"need shards 1..N of one N exactly once, got {', '.join(f'{k}/{m}' for k, m in specs)}")
        # manifest position of every item of every shard
        placed = []
        for si, s in enumerate(stores):
            rows = s.attrs["shard_rows"]
            placed += [(int(r), si, i) for i, r in enumerate(rows)]
        placed.sort()
        tables = [s.items for s in stores]
        extra = stores[0].extra_columns
        row_dicts = [dict(tables[si].iloc[i]) for _, si, i in placed]
        attrs = {k: v for k, v in stores[0].h5.attrs.items() if k not in ("shard", "shard_rows", "committed_frames", "num_items")}
        attrs["merged_from"] = json.dumps([str(Path(p).name) for p in shards])
        if all(s.attrs.get("rows_digest") for s in stores):  # the row digests of shards add up (extract.rows_digest)
            attrs["rows_digest"] = f"{sum(int(s.attrs['rows_digest'], 16) for s in stores) % 2**256:064x}"
        if first.get("padding_recipe"):  # the clips the recipe cut: every shard's, not the first one's
            recipe = dict(first["padding_recipe"])
            recipe["truncated"] = sum(int(s.attrs["padding_recipe"].get("truncated", 0)) for s in stores)
            attrs["padding_recipe"] = json.dumps(recipe)
        attrs["shard"], attrs["shard_rows"] = "", "[]"
        layer_ids = stores[0].layer_ids
        dims = [stores[0].layer_dim(k) for k in layer_ids]
        writer = StoreWriter.create(out, row_dicts, attrs, dims, str(first["dtype"]), extra, layer_ids=layer_ids,
                                    durable=False)
        where = {(si, i): j for j, (_, si, i) in enumerate(placed)}
        for si, s in enumerate(stores):
            t = tables[si]
            order = np.argsort(t["offset"].to_numpy() + (t["num_frames"].to_numpy() == 0) * 2**62, kind="stable")
            for c in range(0, len(order), chunk_items):
                chunk = order[c : c + chunk_items]
                live = [i for i in chunk if t["num_frames"].iloc[i] > 0]
                blocks = {}
                if live:
                    lo = int(t["offset"].iloc[live[0]])
                    hi = int(t["offset"].iloc[live[-1]] + t["num_frames"].iloc[live[-1]])
                    blocks = {k: s.h5["layers"][f"{k:02d}"][lo:hi] for k in layer_ids}
                entries = []
                for i in chunk:
                    fields = {col: t[col].iloc[i] for col in ITEM_COLUMNS if col not in ("offset", "num_frames")}
                    nf = int(t["num_frames"].iloc[i])
                    if nf == 0:
                        entries.append((where[(si, int(i))], fields, None))
                        continue
                    a = int(t["offset"].iloc[i]) - lo
                    entries.append((where[(si, int(i))], fields, [blocks[k][a : a + nf] for k in layer_ids]))
                writer.write_items(entries)
        return writer.finalize()
    finally:
        for s in stores:
            s.close()

"""Where a result's features come from: the provenance of each store (encoder, revision, control
and padding labels, manifest hash, creation time, versions), read from its root attributes.

The sweep writes it to ``stores.json`` when it runs (a report made later does not need the store
files); the doctor and the analysis read it from the stores they open. Reports show it as one
table (:func:`provenance_table`), and every table, legend and title names a store by its
``label`` (:func:`probes.names.store_label`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from probes.names import store_label, store_tags

#: root attributes copied into the provenance (absent ones are left out)
ATTRS = ("encoder", "encoder_revision", "control", "random_init_seed", "padding_exact", "padding_recipe",
         "manifest_sha256", "created_at", "versions", "format_version", "num_layers", "dtype", "sample_rate")


def provenance_from_attrs(name: str, attrs: Mapping[str, Any], path: str | os.PathLike | None = None,
                          **extra: Any) -> dict:
    """Provenance of a store from its (decoded) root attributes."""
    from probes.tables import jsonable

    out: dict[str, Any] = {"name": str(name), "label": store_label(name, attrs), "tags": store_tags(attrs)}
    if path is not None:
        out["path"] = str(path)
    for key in ATTRS:
        if key in attrs:
            out[key] = jsonable(attrs[key])
    out.update(jsonable(extra))
    return out


def store_provenance(path: str | os.PathLike, name: str | None = None) -> dict:
    """Provenance of the store at ``path`` (``name`` default: its file stem), with its item count
    and stored layer ids; a store that cannot be opened gives ``{"name", "label", "path", "error"}``."""
    from featstore.store import open_store

    path = Path(path)
    name = name or path.stem
    try:
        with open_store(path) as store:
            return provenance_from_attrs(name, store.attrs, path, num_items=store.num_items,
                                         layers=list(store.layer_ids))
    except (OSError, ValueError, KeyError) as exc:
        return {"name": name, "label": name, "tags": [], "path": str(path), "error": f"cannot read the store: {exc}"}


def labels(provenances: Mapping[str, Mapping] | Iterable[Mapping]) -> dict[str, str]:
    """``{name: label}`` of provenance records (a mapping by name or a list)."""
    recs = provenances.values() if isinstance(provenances, Mapping) else provenances
    return {str(p["name"]): str(p.get("label") or p["name"]) for p in recs}


def _versions(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "" if value is None else str(value)


def _layers(value: Any) -> str:
    if not isinstance(value, (list, tuple)) or not value:
        return "" if value is None else str(value)
    ids = [int(v) for v in value]
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{len(ids)} ({ids[0]}-{ids[-1]})"
    return f"{len(ids)} ({','.join(map(str, ids))})"


def _padding(p: Mapping) -> str:
    if "padding_exact" not in p:
        return "not recorded"
    tags = [t for t in p.get("tags", []) if "control" not in t]
    return "; ".join(tags) if tags else "padding-exact"


def _control(p: Mapping) -> str:
    tags = [t for t in p.get("tags", []) if "control" in t]
    if not tags:
        return "no (trained weights)" if "encoder" in p else ""
    seed = p.get("random_init_seed")
    return tags[0] + (f", seed {seed}" if seed is not None else "")


def provenance_table(provenances: Mapping[str, Mapping] | Iterable[Mapping]) -> pd.DataFrame:
    """One row per store: store (label), file, encoder, revision, control, padding, layers,
    items, manifest sha256, created, versions."""
    recs = list(provenances.values() if isinstance(provenances, Mapping) else provenances)
    rows = []
    for p in recs:
        if p.get("error"):
            rows.append({"store": p["label"], "file": Path(p.get("path", "")).name, "encoder": p["error"]})
            continue
        rows.append({
            "store": p["label"], "file": Path(p.get("path", "")).name, "encoder": p.get("encoder", ""),
            "revision": f"`{p['encoder_revision']}`" if p.get("encoder_revision") else "not recorded", "control": _control(p), "padding": _padding(p),
            "layers": _layers(p.get("layers")), "items": p.get("num_items", ""),
            "manifest sha256": f"`{p['manifest_sha256']}`" if p.get("manifest_sha256") else "not recorded",
            "created": p.get("created_at") or "not recorded", "versions": _versions(p.get("versions")),
        })
    return pd.DataFrame(rows).fillna("")

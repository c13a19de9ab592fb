"""Train one chosen configuration on all labelled items, save it with provenance, apply it.

A *bundle* is a dict saved with joblib: the fitted estimator plus what is needed to use it
honestly — the store it came from (encoder, revision, a hash of the encoder config, feature
width), the configuration (layer, pooling, scope, probe, class weighting), the label set and an
optional CV score. :func:`predict_store` refuses a store whose encoder, revision or feature width
differs from the bundle's (:class:`BundleMismatch`), because the probe's weights mean nothing on
other features.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featstore.cv import fit_groups
from featstore.store import OK, Store, open_store
from probes.names import CLASS_WEIGHTS, POOLINGS, PROBES, SCOPES, SELF_POOLING, probe_input_kind
from probes.tables import write_csv

BUNDLE_FORMAT = "featstore-probe"
BUNDLE_VERSION = 1


class BundleMismatch(ValueError):
    """The store's features are not the ones the bundle was trained on."""


#: encoder_config keys that change without changing the features (library version, load path)
_VOLATILE = ("transformers_version",)


def _encoder_config_hash(attrs: dict) -> str:
    """Hash of the store's ``encoder_config`` without volatile keys (``_*``, transformers_version)."""
    cfg = attrs.get("encoder_config", "")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg) if cfg else {}
        except ValueError:
            pass
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if not str(k).startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _layer_spec(layer: int | str) -> int | str:
    if isinstance(layer, str) and layer.strip().lower() == "all":
        return "all"
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise ValueError(f"bad layer {layer!r}: give a layer index or 'all'") from None


def _store_layers(store: Store) -> list[int]:
    return list(store.layer_ids)


def _features(store: Store, probe: str, layer: int | str, pooling: str, scope: str, rows: np.ndarray,
              layers_used: list[int] | None = None) -> tuple[Any, int]:
    """Probe input for ``rows`` and the feature width it is based on."""
    from probes.pooling import all_layers_matrix, frame_sequences, pooled_matrix

    kind = probe_input_kind(probe)
    have = _store_layers(store)
    if kind == "layers":
        layers = layers_used if layers_used is not None else have
        missing = [k for k in layers if k not in have]
        if missing:
            raise BundleMismatch(f"{store.path} lacks layer(s) {missing} that the model uses")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = all_layers_matrix(store, SELF_POOLING["layers"], scope, layers, rows, cache=False)
        return x, int(x.shape[-1])
    if layer == "all":
        raise ValueError(f"probe {probe!r} takes one layer, not 'all'")
    if layer not in have:
        raise BundleMismatch(f"{store.path} has no layer {layer} (it has {','.join(map(str, have))})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "frames":
            return frame_sequences(store, layer, scope, rows), store.layer_dim(layer)
        return pooled_matrix(store, layer, pooling, scope, rows, cache=False), store.layer_dim(layer)


def fit_final(
    store: str | os.PathLike,
    layer: int | str,
    pooling: str = "mean",
    probe: str = "logreg",
    class_weight: str | None = "none",
    scope: str = "auto",
    out: str | os.PathLike | None = None,
    cv_score: float | None = None,
    seed: int = 0,
    n_threads: int = 1,
    params: dict | None = None,
) -> dict:
    """Fit ``probe`` on every labelled ok item of ``store``; return the bundle (saved to ``out``).

    ``layer`` is a layer index, or ``"all"`` for the weighted-layers probe; ``pooling`` is ignored
    by probes that pool by themselves (attn-mlp: ``attention``, weighted-layers: ``mean``);
    ``params`` are extra ``make_probe`` parameters.
    """
    import joblib

    from probes.estimators import make_probe
    from probes.pooling import resolve_scope

    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; use one of {', '.join(PROBES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if class_weight not in (None, "None", *CLASS_WEIGHTS):
        raise ValueError(f"unknown class weight {class_weight!r}; use one of {', '.join(CLASS_WEIGHTS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    cw = None if class_weight in (None, "none", "None") else class_weight
    layer = _layer_spec(layer)
    kind = probe_input_kind(probe)
    if kind != "pooled":
        pooling = SELF_POOLING[kind]
    if kind == "layers":
        layer = "all"
    path = Path(store)
    with open_store(path) as st:
        labels = np.array([str(v).strip() for v in st.column("label")], dtype=object)
        rows = np.flatnonzero((st.column("status") == OK) & (st.column("num_frames") > 0) & (labels != ""))
        if not len(rows):
            raise ValueError(f"{path}: no labelled items with status ok to train on")
        classes, y = np.unique(labels[rows].astype(str), return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"{path}: only one label ({classes[0]!r}); a probe needs two or more")
        real_scope = resolve_scope(st, scope)
        layers_used = _store_layers(st) if kind == "layers" else None
        x, dim = _features(st, probe, layer, pooling, real_scope, rows, layers_used)
        attrs = st.attrs
        est = make_probe(probe, class_weight=cw, random_state=seed, n_threads=n_threads, **(params or {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = fit_groups(st.column("group")[rows])
            if groups is not None:
                est.fit(x, y, groups=groups)
            else:
                est.fit(x, y)
    bundle = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "estimator": est,
        "classes": [str(c) for c in classes], "probe": probe, "class_weight": cw or "none",
        "layer": layer, "layers_used": layers_used, "pooling": pooling, "scope": real_scope,
        "feature_dim": int(dim), "encoder": str(attrs.get("encoder", "")),
        "encoder_revision": str(attrs.get("encoder_revision", "")),
        "encoder_config_sha256": _encoder_config_hash(attrs), "store_format_version": attrs.get("format_version"),
        "trained_on": str(path), "n_train": int(len(rows)),
        "label_counts": {str(c): int((y == i).sum()) for i, c in enumerate(classes)},
        "cv_score": None if cv_score is None else float(cv_score), "seed": seed, "params": dict(params or {}),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(bundle, out)
    return bundle


def load_bundle(path: str | os.PathLike) -> dict:
    """Load a bundle written by :func:`fit_final` (checks its format)."""
    import joblib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    try:
        bundle = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a bundle"
        raise ValueError(f"{path} is not a saved probe model ({type(exc).__name__}: {exc})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not a saved probe model (written by `probes fit`)")
    if int(bundle.get("format_version", -1)) > BUNDLE_VERSION:
        raise ValueError(f"{path} has model format_version {bundle['format_version']}; this version reads {BUNDLE_VERSION}")
    return bundle


def check_compatible(bundle: dict, store: Store) -> None:
    """Raise :class:`BundleMismatch` unless ``store`` has the features the bundle was trained on."""
    attrs = store.attrs
    enc, rev = str(attrs.get("encoder", "")), str(attrs.get("encoder_revision", ""))
    if enc != bundle["encoder"] or rev != bundle["encoder_revision"]:
        raise BundleMismatch(
            f"the model was trained on features of encoder {bundle['encoder']!r} (revision "
            f"{bundle['encoder_revision'] or '-'}), but {store.path} holds {enc!r} (revision {rev or '-'}); "
            "extract the clips with the model's encoder"
        )
    if _encoder_config_hash(attrs) != bundle["encoder_config_sha256"]:
        raise BundleMismatch(f"{store.path} was extracted with a different encoder configuration than the model's")
    layers = bundle["layers_used"] if bundle["layer"] == "all" else [bundle["layer"]]
    have = _store_layers(store)
    for k in layers:
        if k not in have:
            raise BundleMismatch(f"{store.path} has no layer {k} (it has {','.join(map(str, have))}); the model needs it")
        if store.layer_dim(k) != bundle["feature_dim"]:
            raise BundleMismatch(
                f"layer {k} of {store.path} is {store.layer_dim(k)} wide, the model expects {bundle['feature_dim']}")


def predict_store(bundle: dict | str | os.PathLike, store: str | os.PathLike | Store) -> pd.DataFrame:
    """Label every item of ``store``: DataFrame ``id, status, pred, proba_<class>...``.

    Items whose status is not ``ok`` (no frames) get an empty ``pred`` and NaN probabilities.
    """
    if not isinstance(bundle, dict):
        bundle = load_bundle(bundle)
    own = not isinstance(store, Store)
    st = open_store(store) if own else store
    try:
        check_compatible(bundle, st)
        status = st.column("status")
        rows = np.flatnonzero((status == OK) & (st.column("num_frames") > 0))
        classes = bundle["classes"]
        proba = np.full((st.num_items, len(classes)), np.nan)
        pred = np.full(st.num_items, "", dtype=object)
        if len(rows):
            x, _ = _features(st, bundle["probe"], bundle["layer"], bundle["pooling"], bundle["scope"], rows,
                             bundle.get("layers_used"))
            est = bundle["estimator"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                local = np.asarray(est.predict_proba(x), dtype=np.float64)
                codes = np.asarray(est.predict(x)).astype(np.int64)
            proba[np.ix_(rows, np.asarray(est.classes_, dtype=np.int64))] = local
            pred[rows] = np.asarray(classes, dtype=object)[codes]
        df = pd.DataFrame({"id": st.column("id"), "status": status, "pred": pred})
        for c, name in enumerate(classes):
            df[f"proba_{name}"] = proba[:, c]
        return df
    finally:
        if own:
            st.close()


def write_predictions(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write :func:`predict_store`'s table as CSV (the one table writer, :mod:`probes.tables`)."""
    return write_csv(df, out)

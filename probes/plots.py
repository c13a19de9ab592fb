"""Every figure of the probes, in one place (matplotlib ``Figure`` objects, no pyplot state):

* sweep: balanced accuracy per layer (:func:`draw_layer_curves`), the stores side by side
  (:func:`draw_store_comparison`), the layer x pooling heatmap (:func:`draw_heatmap`) and the
  confusion matrix (:func:`draw_confusion`);
* doctor: the layer profile (:func:`draw_doctor_profile`);
* analysis: the per-layer score profile (:func:`draw_analysis_profile`) and the layer-to-layer
  similarity heatmap (:func:`draw_similarity`).

Each ``draw_*`` returns the figure (tests inspect its axes and artists); each ``plot_*`` draws
and writes a PNG and returns its path. The rules every figure follows:

* layers are plotted at their stored ids (a store extracted with layers 0, 4, 8 plots at 0, 4, 8),
  with integer ticks only and at most :data:`MAX_TICKS` labelled ones (:func:`layer_ticks`);
* a store with one layer is drawn as labelled points or bars over its configurations or
  targets, never as one dot on a layer axis;
* legends and titles name stores by :func:`probes.names.store_label` (``whisper [random-init
  control]``, ``wavlm [padded to 1.0 s]``) and label the baselines (``majority baseline``,
  ``chance baseline``, the shuffled floor).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from probes.names import ANALYSIS_METHODS, BASELINES

#: at most this many labelled layer ticks on any axis (a 25-layer axis labels every second layer)
MAX_TICKS = 13
DPI = 110
MAJORITY = dict(ls="--", lw=1.2, color="black")
CHANCE = dict(ls="-.", lw=1.2, color="tab:grey")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    fig.savefig(out, dpi=DPI)
    return out


def layer_ticks(layers: Sequence[int], max_ticks: int = MAX_TICKS) -> list[int]:
    """The layer ids to label: all of them up to ``max_ticks``, else every n-th one (from the
    first), n the smallest step that keeps at most ``max_ticks`` (0-24: 0, 2, ..., 24)."""
    ids = sorted({int(k) for k in layers})
    if len(ids) <= max_ticks:
        return ids
    return ids[:: math.ceil(len(ids) / max_ticks)]


def set_layer_axis(ax, layers: Sequence[int], axis: str = "x", label: str = "layer") -> None:
    """A data axis over layer ids: integer ticks (:func:`layer_ticks`), an unlabelled minor tick
    at every stored layer when they are thinned, limits half a step beyond the first and last."""
    ids = sorted({int(k) for k in layers})
    ticks = layer_ticks(ids)
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_ticks(ticks, [str(t) for t in ticks])
    set_ticks(ids if len(ticks) < len(ids) else [], minor=True)
    steps = np.diff(ids)
    pad = 0.5 * (float(steps.min()) if len(steps) else 1.0)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(ids[0] - pad, ids[-1] + pad)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def set_index_layer_ticks(ax, layers: Sequence[int], axis: str = "y", label: str = "layer",
                          fontsize: float | None = None) -> None:
    """Ticks of an image axis whose i-th row/column is stored layer ``layers[i]``: at most
    :data:`MAX_TICKS` labelled, each label the layer id."""
    ids = [int(k) for k in layers]
    show = set(layer_ticks(ids))
    pos = [i for i, k in enumerate(ids) if k in show]
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    kw = {} if fontsize is None else {"fontsize": fontsize}
    set_ticks(pos, [str(ids[i]) for i in pos], **kw)
    set_ticks([i for i in range(len(ids)) if i not in pos], minor=True)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def _layer_num(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.astype(str), errors="coerce")


def _only_store(df: pd.DataFrame, store: str | None) -> tuple[pd.DataFrame, str]:
    names = list(dict.fromkeys(df["store"]))
    if store is None:
        if len(names) != 1:
            raise ValueError(f"the table holds {len(names)} stores ({', '.join(map(str, names))}): name one, "
                             "or draw them side by side with draw_store_comparison")
        store = names[0]
    sub = df[df["store"] == store]
    if sub.empty:
        raise ValueError(f"no rows of store {store!r}")
    return sub, str(store)


def _baseline_lines(ax, base: pd.DataFrame, suffix: str = "", color: str | None = None) -> None:
    for probe in BASELINES:
        r = base[base["probe"] == probe]
        if len(r):
            style = dict(MAJORITY if probe == "majority" else CHANCE)
            if color is not None:
                style["color"] = color
            ax.axhline(float(r["balanced_accuracy_mean"].iloc[0]), label=f"{probe} baseline{suffix}", **style)


def _ci(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    if "bacc_ci_low" not in rows or "bacc_ci_high" not in rows:
        return None
    lo, hi = rows["bacc_ci_low"].to_numpy(float), rows["bacc_ci_high"].to_numpy(float)
    return (lo, hi) if np.isfinite(lo).any() else None


def _points(ax, x: np.ndarray, y: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None, color=None,
            label: str | None = None, fmt: str = "o", annotate: bool = True, **kw) -> None:
    """Points with interval bars and their values written beside them (the one-layer drawing)."""
    yerr = None
    if lo is not None and hi is not None:
        yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        yerr = np.where(np.isfinite(yerr), yerr, 0.0)
    ax.errorbar(x, y, yerr=yerr, fmt=fmt, ms=7, capsize=4, lw=1.4, color=color, label=label, **kw)
    if annotate:
        for xi, yi in zip(x, y):
            if np.isfinite(yi):
                ax.annotate(f"{yi:.2f}", (xi, yi), xytext=(7, 0), textcoords="offset points", va="center",
                            fontsize=8)


def _wrap_label(label: str) -> str:
    """A store label with its bracketed tags on a second line (for category ticks)."""
    return label.replace(" [", "\n[", 1)


def _legend_outside(fig, axes) -> None:
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------
def draw_layer_curves(summary: pd.DataFrame, store: str | None = None, label: str | None = None):
    """Balanced accuracy per layer of one store: one line per probe/pooling (a panel per class
    weighting) with its speaker-bootstrap 95 % band, a weighted-layers probe (layer ``all``) as a
    dotted line, the majority and chance baselines of the same folds as labelled lines. A store
    with one layer: one point per probe/pooling with its interval and value."""
    df, store = _only_store(summary, store)
    label = label or store
    probes = df[~df["probe"].isin(BASELINES)].copy()
    probes["layer_num"] = _layer_num(probes["layer"])
    base = df[df["probe"].isin(BASELINES)]
    weights = list(dict.fromkeys(probes["class_weight"])) or ["none"]
    layers = sorted(int(v) for v in probes["layer_num"].dropna().unique())
    one = len(layers) <= 1
    n_cat = max([len(probes[probes["class_weight"] == cw].groupby(["probe", "pooling", "layer"])) for cw in weights] + [1])
    width = (max(4.5, 1.0 + 0.7 * n_cat) if one else 5.5) * len(weights) + 2.8
    fig = _figure(width, 4.4)
    axes = fig.subplots(1, len(weights), sharey=True, squeeze=False)[0]
    for ax, cw in zip(axes, weights):
        sub = probes[probes["class_weight"] == cw]
        if one:
            cats = sub.sort_values(["layer_num", "probe", "pooling"], na_position="last")
            names = [f"{r.probe}/{r.pooling}" + (" (all layers)" if pd.isna(r.layer_num) else "")
                     for r in cats.itertuples()]
            x = np.arange(len(cats))
            ci = _ci(cats)
            _points(ax, x, cats["balanced_accuracy_mean"].to_numpy(float), *(ci or (None, None)),
                    color="tab:blue", label="probe, 95 % CI (speaker bootstrap)")
            ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.6, len(cats) - 0.4)
            ax.set_xlabel(f"probe / pooling (layer {layers[0]}, the store's only layer)" if layers else "probe / pooling")
        else:
            per_layer = sub[sub["layer_num"].notna()]
            for (probe, pooling), g in per_layer.groupby(["probe", "pooling"], sort=True):
                g = g.sort_values("layer_num")
                x = g["layer_num"].to_numpy(float)
                (line,) = ax.plot(x, g["balanced_accuracy_mean"], marker="o", ms=3, label=f"{probe}/{pooling}")
                ci = _ci(g)
                if ci is not None:
                    ax.fill_between(x, ci[0], ci[1], color=line.get_color(), alpha=0.12, lw=0)
            for _, r in sub[sub["layer_num"].isna()].iterrows():
                ax.axhline(r["balanced_accuracy_mean"], ls=":", lw=1.5, color="tab:purple",
                           label=f"{r['probe']}/{r['pooling']} (all layers)")
            set_layer_axis(ax, layers)
        _baseline_lines(ax, base)
        ax.set_title(f"class weight: {cw}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("balanced accuracy (out of fold)")
    _legend_outside(fig, axes)
    fig.suptitle(f"Balanced accuracy per layer — {label}")
    return fig


def plot_layer_curves(summary: pd.DataFrame, out: str | os.PathLike, store: str | None = None,
                      label: str | None = None) -> Path:
    """:func:`draw_layer_curves` written to ``out`` (PNG)."""
    return _save(draw_layer_curves(summary, store, label), out)


def best_per_layer(summary: pd.DataFrame, store: str) -> pd.DataFrame:
    """The best per-layer configuration of each layer of ``store`` (by mean balanced accuracy,
    ties by config name): layer, config, balanced_accuracy_mean and its interval."""
    df = summary[(summary["store"] == store) & ~summary["probe"].isin(BASELINES)].copy()
    df["layer_num"] = _layer_num(df["layer"])
    df = df[df["layer_num"].notna()].sort_values(["layer_num", "balanced_accuracy_mean", "config"],
                                                 ascending=[True, False, True])
    return df.groupby("layer_num", sort=True).head(1).reset_index(drop=True)


def draw_store_comparison(summary: pd.DataFrame, labels: Mapping[str, str] | None = None):
    """The stores of one sweep side by side: per store the best configuration at each layer
    (with its 95 % band), a one-layer store as a labelled point at its layer plus a dotted line
    across (or, when every store has one layer, one bar per store), and the baselines (one
    majority and one chance line when the stores share them, else one pair per store)."""
    labels = dict(labels or {})
    stores = list(dict.fromkeys(summary["store"]))
    best = {st: best_per_layer(summary, st) for st in stores}
    best = {st: b for st, b in best.items() if len(b)}
    if not best:
        raise ValueError("no per-layer results to compare")
    multi = {st: b for st, b in best.items() if len(b) > 1}
    colors = {st: f"C{i}" for i, st in enumerate(best)}
    fig = _figure(9.5 if multi else max(4.5, 1.6 + 1.5 * len(best)) + 2.6, 4.6)
    ax = fig.subplots()
    if multi:
        for st, b in best.items():
            x, y = b["layer_num"].to_numpy(float), b["balanced_accuracy_mean"].to_numpy(float)
            name = labels.get(st, st)
            ci = _ci(b)
            if len(b) > 1:
                ax.plot(x, y, marker="o", ms=3, color=colors[st], label=f"{name} (best per layer)")
                if ci is not None:
                    ax.fill_between(x, ci[0], ci[1], color=colors[st], alpha=0.12, lw=0)
            else:
                _points(ax, x, y, *(ci or (None, None)), color=colors[st], fmt="D",
                        label=f"{name} (one layer: {int(x[0])})")
                ax.axhline(y[0], color=colors[st], ls=":", lw=1)
        set_layer_axis(ax, sorted({int(v) for b in best.values() for v in b["layer_num"]}))
    else:
        x = np.arange(len(best))
        ys = np.array([float(b["balanced_accuracy_mean"].iloc[0]) for b in best.values()])
        cis = [_ci(b) for b in best.values()]
        lo = np.array([c[0][0] if c else np.nan for c in cis])
        hi = np.array([c[1][0] if c else np.nan for c in cis])
        for xi, yi, st in zip(x, ys, best):
            ax.bar([xi], [yi], color=colors[st], alpha=0.8, width=0.6, label=f"{labels.get(st, st)} (best configuration)")
        _points(ax, x, ys, lo, hi, color="black", fmt="none", annotate=False, label="95 % CI (speaker bootstrap)")
        for xi, yi in zip(x, ys):  # beside the interval bar, not under it
            ax.annotate(f"{yi:.2f}", (xi, yi), xytext=(8, 2), textcoords="offset points", ha="left",
                        va="bottom", fontsize=8)
        ax.set_xticks(x, [_wrap_label(labels.get(st, st)) + f"\n(layer {int(b['layer_num'].iloc[0])})"
                          for st, b in best.items()], fontsize=8)
        ax.set_xlim(-0.6, len(best) - 0.4)
        ax.set_xlabel("store")
    base = summary[summary["probe"].isin(BASELINES)]
    shared = all(base[base["probe"] == p].groupby("store")["balanced_accuracy_mean"].first().round(6).nunique() <= 1
                 for p in BASELINES)
    if shared:
        _baseline_lines(ax, base.drop_duplicates("probe"))
    else:
        for st in best:
            _baseline_lines(ax, base[base["store"] == st], f" ({labels.get(st, st)})", colors[st])
    ax.set_ylabel("balanced accuracy (out of fold)")
    ax.grid(alpha=0.3)
    ax.set_title("Stores side by side: best configuration per layer", fontsize=10)
    _legend_outside(fig, [ax])
    return fig


def plot_store_comparison(summary: pd.DataFrame, out: str | os.PathLike, labels: Mapping[str, str] | None = None) -> Path:
    """:func:`draw_store_comparison` written to ``out`` (PNG)."""
    return _save(draw_store_comparison(summary, labels), out)


def heatmap_table(summary: pd.DataFrame, store: str | None = None) -> pd.DataFrame:
    """Layer x pooling table of the best balanced accuracy over probes and class weightings."""
    df = summary if store is None else summary[summary["store"] == store]
    df = df[~df["probe"].isin(BASELINES)].copy()
    df["layer_num"] = _layer_num(df["layer"])
    df = df[df["layer_num"].notna()]
    table = df.pivot_table(index="layer_num", columns="pooling", values="balanced_accuracy_mean", aggfunc="max")
    table.index = table.index.astype(int)
    return table.sort_index()


def _annotate_cells(ax, vals: np.ndarray, fontsize: float = 7, dark_below: float | None = None) -> None:
    mid = np.nanmean(vals) if dark_below is None else dark_below
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if vals[i, j] < mid else "black")


def draw_heatmap(summary: pd.DataFrame, store: str | None = None, label: str | None = None):
    """Heatmap of :func:`heatmap_table` (every cell annotated with its value; rows at the stored
    layer ids, at most :data:`MAX_TICKS` labelled)."""
    table = heatmap_table(summary, store)
    if table.empty:
        raise ValueError("no per-layer results for a heatmap")
    label = label or store or str(summary["store"].iloc[0])
    vals = table.to_numpy(dtype=float)
    fig = _figure(1.2 * max(3, table.shape[1]) + 2.4, 0.3 * max(4, table.shape[0]) + 1.9)
    ax = fig.subplots()
    im = ax.imshow(vals, aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_xlabel("pooling")
    set_index_layer_ticks(ax, list(table.index), "y")
    _annotate_cells(ax, vals)
    fig.colorbar(im, ax=ax, label="balanced accuracy (best probe)")
    ax.set_title(f"Layer x pooling — {label}", fontsize=10)
    return fig


def plot_heatmap(summary: pd.DataFrame, out: str | os.PathLike, store: str | None = None,
                 label: str | None = None) -> Path:
    """:func:`draw_heatmap` written to ``out`` (PNG)."""
    return _save(draw_heatmap(summary, store, label), out)


def confusion_counts(predictions: pd.DataFrame, config: str) -> tuple[list[str], np.ndarray]:
    """Classes and the count matrix (true x predicted) of one configuration's predictions."""
    df = predictions[predictions["config"] == config]
    if df.empty:
        raise ValueError(f"no predictions for configuration {config!r}")
    classes = sorted(set(df["label"].astype(str)) | set(df["pred"].astype(str)))
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(df["label"].astype(str), df["pred"].astype(str)):
        conf[idx[t], idx[p]] += 1
    return classes, conf


def draw_confusion(predictions: pd.DataFrame, config: str, label: str | None = None):
    """Row-normalised confusion matrix (with counts) of one configuration's out-of-fold predictions."""
    classes, conf = confusion_counts(predictions, config)
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    fig = _figure(1.2 * len(classes) + 3.0, 1.1 * len(classes) + 2.0)
    ax = fig.subplots()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({conf[i, j]})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="recall (row-normalised)")
    ax.set_title("Out-of-fold confusion" + (f" — {label}" if label else "") + f"\n{config}", fontsize=9)
    return fig


def plot_confusion(predictions: pd.DataFrame, config: str, out: str | os.PathLike, label: str | None = None) -> Path:
    """:func:`draw_confusion` written to ``out`` (PNG)."""
    return _save(draw_confusion(predictions, config, label), out)


# ---------------------------------------------------------------------------------------------
# Doctor
# ---------------------------------------------------------------------------------------------
def draw_doctor_profile(prof: Mapping, label: str, baseline_label: str | None = None):
    """The doctor's layer profile (``prof`` from :func:`probes.doctor.plot.profile_data`): the
    screen score per layer for mean and stats pooling, the best configuration's logistic-regression
    score (star), chance, the shuffled-label 95th percentile and the baseline store. One layer:
    one bar per pooling with its value."""
    layers = [int(k) for k in prof["layers"]]
    poolings = [p for p in ("mean", "stats") if all((k, p) in prof["scores"] for k in layers)]
    bl, bp = prof["best"]
    one = len(layers) == 1
    fig = _figure(5.0 if one else 7.0, 4.2)
    ax = fig.subplots()
    if one:
        x = np.arange(len(poolings))
        ys = [float(prof["scores"][(layers[0], p)]) for p in poolings]
        ax.bar(x, ys, width=0.55, color=["C0", "C1"][: len(poolings)], label="screen score")
        for xi, yi in zip(x, ys):
            ax.annotate(f"{yi:.2f}", (xi, yi), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
        xb = poolings.index(bp) if bp in poolings else 0
        ax.plot([xb], [prof["best_logreg"]], "k*", ms=12, label=f"best, logreg ({bp}): {prof['best_logreg']:.2f}")
        ax.set_xticks(x, [f"{p} pooling" for p in poolings])
        ax.set_xlim(-0.6, len(poolings) - 0.4)
        ax.set_xlabel(f"layer {layers[0]} (the only layer screened)")
    else:
        for pooling, marker in zip(poolings, ("o", "s")):
            ax.plot(layers, [prof["scores"][(k, pooling)] for k in layers], marker=marker, ms=4,
                    label=f"{pooling} (screen)")
        ax.plot([bl], [prof["best_logreg"]], "k*", ms=12, label=f"best, logreg (layer {bl}, {bp})")
        set_layer_axis(ax, layers)
    ax.axhline(prof["chance"], label="chance", **CHANCE)
    if np.isfinite(prof.get("null_hi", np.nan)):
        ax.axhline(prof["null_hi"], color="grey", ls=":", lw=1, label="shuffled labels, 95th pct")
    if "baseline" in prof:
        name = baseline_label or prof["baseline"]["name"]
        ax.axhline(prof["baseline"]["score"], color="tab:red", ls="-.", lw=1.2, label=f"baseline {name} (logreg)")
    ax.set_ylabel("balanced accuracy (out of fold)")
    ax.set_title(f"layer profile: {label}", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    return fig


def plot_doctor_profile(prof: Mapping, label: str, path: str | os.PathLike, baseline_label: str | None = None) -> Path | None:
    """:func:`draw_doctor_profile` written to ``path`` (PNG); None when there is no profile."""
    if not prof:
        return None
    return _save(draw_doctor_profile(prof, label, baseline_label), path)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------
def draw_analysis_profile(profile: pd.DataFrame, store: str, label: str | None = None,
                          crossovers: Mapping[str, int | None] | None = None):
    """Score vs layer, one panel per method, one line per target with its bootstrap band and the
    shuffled floor (dashed); ``crossovers`` marks a layer per method (the target rising above the
    speaker). One layer: per method, one point per target with its interval and value, and the
    shuffled floor beside it (hollow, with its 2.5-97.5 % range)."""
    d = profile[profile.store == store]
    if d.empty:
        raise ValueError(f"no profile rows of store {store!r}")
    label = label or store
    methods = [m for m in ANALYSIS_METHODS if m in set(d.method)] or list(dict.fromkeys(d.method))
    targets = list(dict.fromkeys(d.target))
    colors = {t: f"C{i}" for i, t in enumerate(targets)}
    layers = sorted(int(k) for k in d.layer.unique())
    one = len(layers) == 1
    fig = _figure((max(3.4, 1.4 + 0.9 * len(targets)) if one else 4.4) * len(methods) + 2.2, 3.8)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        for i, t in enumerate(targets):
            for shuffled in (False, True):
                e = d[(d.method == method) & (d.target == t) & (d.shuffled == shuffled)].sort_values("layer")
                if e.empty:
                    continue
                if one:
                    x = np.array([i + (0.25 if shuffled else 0.0)])
                    _points(ax, x, e.score.to_numpy(float), e.ci_low.to_numpy(float), e.ci_high.to_numpy(float),
                            color="tab:grey" if shuffled else colors[t], fmt="o", mfc="white" if shuffled else None,
                            label="shuffled floor (2.5-97.5 %)" if shuffled else f"{t}, 95 % CI (speaker bootstrap)")
                    continue
                style = dict(color=colors[t], ls="--" if shuffled else "-", lw=1 if shuffled else 1.8,
                             marker=None if shuffled else "o", ms=3, label=f"{t} (shuffled)" if shuffled else t)
                ax.plot(e.layer, e.score, **style)
                ax.fill_between(e.layer.to_numpy(float), e.ci_low.to_numpy(float), e.ci_high.to_numpy(float),
                                color=colors[t], alpha=0.07 if shuffled else 0.2, lw=0)
        if one:
            ax.set_xticks(np.arange(len(targets)) + 0.125, targets)
            ax.set_xlim(-0.5, len(targets) - 0.25)
            ax.set_xlabel(f"target (layer {layers[0]}, the only layer)")
        else:
            set_layer_axis(ax, layers)
            layer = (crossovers or {}).get(method)
            if layer is not None:
                ax.axvline(layer, color="k", ls=":", lw=1)
                ax.annotate("crossover", (layer, 1.0), xycoords=("data", "axes fraction"), ha="left", va="top",
                            fontsize=8, xytext=(3, -3), textcoords="offset points")
        ax.set_title(method, fontsize=10)
        ax.set_ylabel("held-out CCA" if method != "cka" else "linear CKA")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Layer profile — {label}", fontsize=11)
    _legend_outside(fig, axes)
    return fig


def plot_analysis_profile(profile: pd.DataFrame, store: str, path: str | os.PathLike, label: str | None = None,
                          crossovers: Mapping[str, int | None] | None = None) -> Path:
    """:func:`draw_analysis_profile` written to ``path`` (PNG)."""
    return _save(draw_analysis_profile(profile, store, label, crossovers), path)


def draw_similarity(matrix: np.ndarray, name_a: str, name_b: str, method: str,
                    layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None):
    """Heatmap of a layer-to-layer similarity matrix (rows: ``name_a``'s layers, columns:
    ``name_b``'s, at their stored ids; values written in the cells up to 13 x 13)."""
    matrix = np.asarray(matrix, dtype=float)
    la = list(layers_a) if layers_a is not None else list(range(matrix.shape[0]))
    lb = list(layers_b) if layers_b is not None else list(range(matrix.shape[1]))
    fig = _figure(max(4.2, 2.2 + 0.3 * len(lb)), max(3.4, 1.6 + 0.3 * len(la)))
    ax = fig.subplots()
    im = ax.imshow(matrix, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
    set_index_layer_ticks(ax, lb, "x", f"{name_b} layer", fontsize=7)
    set_index_layer_ticks(ax, la, "y", f"{name_a} layer", fontsize=7)
    if max(matrix.shape) <= MAX_TICKS:
        _annotate_cells(ax, matrix, fontsize=7 if max(matrix.shape) > 6 else 9, dark_below=0.5)
    ax.set_title(f"{method}: {name_a} vs {name_b}", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_similarity(matrix: np.ndarray, path: str | os.PathLike, name_a: str, name_b: str, method: str,
                    layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None) -> Path:
    """:func:`draw_similarity` written to ``path`` (PNG)."""
    return _save(draw_similarity(matrix, name_a, name_b, method, layers_a, layers_b), path)

"""PNG figures of a sweep (matplotlib, Agg backend): layer curves, layer x pooling heatmap, confusion.

Every function takes the tables a sweep writes (``summary.csv``, ``predictions.csv``) as
DataFrames and returns the path of the PNG it wrote.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from probes.names import BASELINES


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _layer_num(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.astype(str), errors="coerce")


def plot_layer_curves(summary: pd.DataFrame, out: str | os.PathLike, store: str | None = None) -> Path:
    """Balanced accuracy per layer: one line per probe/pooling (a panel per class weighting), with
    speaker-bootstrap CI bands; ``majority`` and ``chance`` as horizontal lines; a weighted-layers
    probe (layer ``all``) as a dotted horizontal line."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    df = summary if store is None else summary[summary["store"] == store]
    probes = df[~df["probe"].isin(BASELINES)].copy()
    probes["layer_num"] = _layer_num(probes["layer"])
    weights = list(dict.fromkeys(probes["class_weight"])) or ["none"]
    fig, axes = plt.subplots(1, len(weights), figsize=(6 * len(weights), 4.2), sharey=True, squeeze=False)
    base = df[df["probe"].isin(BASELINES)]
    for ax, cw in zip(axes[0], weights):
        sub = probes[probes["class_weight"] == cw]
        per_layer = sub[sub["layer_num"].notna()]
        for (probe, pooling), g in per_layer.groupby(["probe", "pooling"], sort=True):
            g = g.sort_values("layer_num")
            x = g["layer_num"].to_numpy()
            (line,) = ax.plot(x, g["balanced_accuracy_mean"], marker="o", ms=3, label=f"{probe}/{pooling}")
            if "bacc_ci_low" in g:
                ax.fill_between(x, g["bacc_ci_low"], g["bacc_ci_high"], color=line.get_color(), alpha=0.12, lw=0)
        for _, r in sub[sub["layer_num"].isna()].iterrows():
            ax.axhline(r["balanced_accuracy_mean"], ls=":", lw=1.5, color="tab:purple", label=f"{r['probe']} (all layers)")
        for _, r in base.iterrows():
            maj = r["probe"] == "majority"
            ax.axhline(r["balanced_accuracy_mean"], ls="--" if maj else "-.", lw=1.2, color="black" if maj else "tab:grey",
                       label=f"{r['probe']}" + (f" ({r['store']})" if store is None and df["store"].nunique() > 1 else ""))
        ax.set_title(f"class weight: {cw}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("balanced accuracy")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Balanced accuracy per layer" + (f" — {store}" if store else ""))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def heatmap_table(summary: pd.DataFrame, store: str | None = None) -> pd.DataFrame:
    """Layer x pooling table of the best balanced accuracy over probes and class weightings."""
    df = summary if store is None else summary[summary["store"] == store]
    df = df[~df["probe"].isin(BASELINES)].copy()
    df["layer_num"] = _layer_num(df["layer"])
    df = df[df["layer_num"].notna()]
    table = df.pivot_table(index="layer_num", columns="pooling", values="balanced_accuracy_mean", aggfunc="max")
    table.index = table.index.astype(int)
    return table.sort_index()


def plot_heatmap(summary: pd.DataFrame, out: str | os.PathLike, store: str | None = None) -> Path:
    """Heatmap of :func:`heatmap_table` (annotated with the values)."""
    plt = _plt()
    table = heatmap_table(summary, store)
    fig, ax = plt.subplots(figsize=(1.3 * max(3, table.shape[1]) + 1.5, 0.38 * max(4, table.shape[0]) + 1.5))
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("pooling")
    ax.set_ylabel("layer")
    vals = table.to_numpy(dtype=float)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if vals[i, j] < np.nanmean(vals) else "black")
    fig.colorbar(im, ax=ax, label="balanced accuracy (best probe)")
    ax.set_title("Layer x pooling" + (f" — {store}" if store else ""))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion(predictions: pd.DataFrame, config: str, out: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix (with counts) of one configuration's out-of-fold predictions."""
    plt = _plt()
    df = predictions[predictions["config"] == config]
    if df.empty:
        raise ValueError(f"no predictions for configuration {config!r}")
    classes = sorted(set(df["label"].astype(str)) | set(df["pred"].astype(str)))
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(df["label"].astype(str), df["pred"].astype(str)):
        conf[idx[t], idx[p]] += 1
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.1 * len(classes) + 1.8))
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
    ax.set_title(f"Out-of-fold confusion\n{config}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

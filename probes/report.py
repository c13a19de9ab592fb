"""``report.md`` and figures of a finished sweep directory (``folds.csv``, ``summary.csv``, ...)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from probes import plots
from probes import selection as S
from probes.names import BASELINES
from probes.tables import fmt as _fmt
from probes.tables import markdown_table as _md_table
from probes.tables import write_text


def _read(out_dir: Path, name: str) -> pd.DataFrame:
    path = out_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} holds no {name}: is it a sweep output directory?")
    return pd.read_csv(path, dtype={"layer": str}, keep_default_na=True)


def _headline_lines(prefix: str, entry: dict) -> list[str]:
    h, o = entry["headline"], entry["other_folds"]
    name = "Nested-CV balanced accuracy" if h["method"] == S.NESTED else "Balanced accuracy, selection on other outer folds (not nested)"
    lines = [f"{prefix}**{name}: {_fmt(h['bacc'])}** — {h['description']}."]
    if h["method"] == S.NESTED:
        lines += ["", f"{prefix}For comparison, {o['description']}: {_fmt(o['bacc'])}."]
    if h.get("folds"):
        lines += ["", "Choices per outer fold:", "",
                  _md_table(pd.DataFrame([{"fold": f["fold"], "chosen configuration": f"`{f['config']}`",
                                           "selection score": _fmt(f["selection_score"]),
                                           "score on fold": _fmt(f["score"])} for f in h["folds"]]))]
    return lines


def write_report(out_dir: str | os.PathLike, top: int = 10) -> Path:
    """Write the plots (PNG) and ``report.md`` into ``out_dir``; return the report's path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {out_dir}")
    summary = _read(out_dir, "summary.csv")
    folds = _read(out_dir, "folds.csv")
    preds_path = out_dir / "predictions.csv"
    best_path = out_dir / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    probes_only = summary[~summary["probe"].isin(BASELINES)]
    if probes_only.empty:
        raise ValueError(f"{out_dir}/summary.csv holds no probe results")
    fp = folds[~folds["probe"].isin(BASELINES)]
    if "per_store" not in best:  # an older sweep directory: only the not-nested selection can be recomputed
        best["per_store"] = {}
        for st, g in fp.groupby("store", sort=False):
            o = S.other_folds_selection(g)
            o["description"] = S.describe(S.OTHER_FOLDS, n_configs=int(g["config"].nunique()))
            best["per_store"][st] = {"headline": o, "other_folds": o}
        if len(best["per_store"]) == 1:
            best.update(next(iter(best["per_store"].values())))
    ranked = probes_only.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True])
    top_row = ranked.iloc[0]
    stores = list(dict.fromkeys(summary["store"]))

    images = []
    for st in stores:
        suffix = "" if len(stores) == 1 else f"_{st}"
        images.append((f"Balanced accuracy per layer — {st}", plots.plot_layer_curves(summary, out_dir / f"layers{suffix}.png", st)))
        if not plots.heatmap_table(summary, st).empty:
            images.append((f"Layer x pooling — {st}", plots.plot_heatmap(summary, out_dir / f"heatmap{suffix}.png", st)))
    if preds_path.exists():
        preds = pd.read_csv(preds_path, dtype={"label": str, "pred": str})
        if (preds["config"] == top_row["config"]).any():
            images.append(("Confusion matrix of the naive best configuration",
                           plots.plot_confusion(preds, top_row["config"], out_dir / "confusion_best.png")))

    lines = ["# Probe sweep report", ""]
    base = summary[summary["probe"].isin(BASELINES)]
    for st in stores:
        b = base[base["store"] == st]
        enc = summary.loc[summary["store"] == st, "encoder"].iloc[0]
        n_items = int(summary.loc[summary["store"] == st, "n_items"].iloc[0])
        maj = b.loc[b["probe"] == "majority", "balanced_accuracy_mean"]
        ch = b.loc[b["probe"] == "chance", "balanced_accuracy_mean"]
        lines.append(f"- store **{st}** (encoder `{enc}`): {n_items} items; baselines of the same folds: "
                     f"majority {_fmt(maj.iloc[0] if len(maj) else np.nan)}, chance {_fmt(ch.iloc[0] if len(ch) else np.nan)}")
    lines += ["", "## Headline", ""]
    if "headline" in best:
        lines += _headline_lines("", best)
    if best.get("headline_note"):
        lines += ["", f"Note: {best['headline_note']}."]
    if "headline" not in best or len(best["per_store"]) > 1:
        for st, entry in best["per_store"].items():
            lines += ["", f"### {st}", ""] + _headline_lines("", entry)
    lines += [
        "",
        f"Naive best (the maximum over {len(probes_only)} configurations, scored on the folds that chose it, "
        f"so optimistic): {_fmt(top_row['balanced_accuracy_mean'])} ± {_fmt(top_row['balanced_accuracy_std'])} "
        f"(speaker-bootstrap 95% CI {_fmt(top_row.get('bacc_ci_low'))}–{_fmt(top_row.get('bacc_ci_high'))}), "
        f"`{top_row['config']}`; majority {_fmt(top_row['majority_bacc'])}, chance {_fmt(top_row['chance_bacc'])}.",
    ]
    cols = {"store": "store", "layer": "layer", "pooling": "pooling", "probe": "probe", "class_weight": "weights"}
    rows = []
    for _, r in ranked.head(top).iterrows():
        row = {v: r[k] for k, v in cols.items()}
        row.update({
            "bacc": f"{_fmt(r['balanced_accuracy_mean'])} ± {_fmt(r['balanced_accuracy_std'])}",
            "95% CI": f"{_fmt(r.get('bacc_ci_low'))}–{_fmt(r.get('bacc_ci_high'))}",
            "macro-F1": _fmt(r["macro_f1_mean"]), "AUC": _fmt(r["roc_auc_ovr_mean"]),
            "majority": _fmt(r["majority_bacc"]), "chance": _fmt(r["chance_bacc"]),
        })
        if "sensitivity_mean" in r:
            row.update(sensitivity=_fmt(r["sensitivity_mean"]), specificity=_fmt(r["specificity_mean"]))
        rows.append(row)
    lines += ["", f"## Best configurations (top {min(top, len(ranked))} by mean balanced accuracy)", "",
              _md_table(pd.DataFrame(rows)), ""]
    lines += ["## Figures", ""]
    for title, path in images:
        lines += [f"### {title}", "", f"![{title}]({Path(path).name})", ""]
    return write_text("\n".join(lines) + "\n", out_dir / "report.md")

"""``report.md`` and figures of a finished sweep directory (``folds.csv``, ``summary.csv``, ...)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from probes import plots

BASELINES = ("majority", "chance")


def _read(out_dir: Path, name: str) -> pd.DataFrame:
    path = out_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} holds no {name}: is it a sweep output directory?")
    return pd.read_csv(path, dtype={"layer": str}, keep_default_na=True)


def _fmt(v, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if np.isnan(v) else f"{v:.{digits}f}"


def _md_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def write_report(out_dir: str | os.PathLike, top: int = 10) -> Path:
    """Write the plots (PNG) and ``report.md`` into ``out_dir``; return the report's path."""
    from probes.sweep import nested_selection

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
    if "nested_bacc" not in best:
        best["nested_bacc"] = nested_selection(folds[~folds["probe"].isin(BASELINES)])["nested_bacc"]
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
    n_folds = int(folds["fold"].max()) + 1
    lines += [
        "", "## Headline", "",
        f"**Nested-CV balanced accuracy: {_fmt(best['nested_bacc'])}** — for each of the {n_folds} outer "
        "folds the configuration with the best mean balanced accuracy on the *other* folds is chosen "
        "and scored on that fold; the selection never sees the fold it is scored on.",
        "",
        f"Naive best (the maximum over {len(probes_only)} configurations, scored on the folds that chose it, "
        f"so optimistic): {_fmt(top_row['balanced_accuracy_mean'])} ± {_fmt(top_row['balanced_accuracy_std'])} "
        f"(speaker-bootstrap 95% CI {_fmt(top_row.get('bacc_ci_low'))}–{_fmt(top_row.get('bacc_ci_high'))}), "
        f"`{top_row['config']}`; majority {_fmt(top_row['majority_bacc'])}, chance {_fmt(top_row['chance_bacc'])}.",
    ]
    if best.get("nested_folds"):
        lines += ["", "Choices per outer fold:", ""]
        lines.append(_md_table(pd.DataFrame(
            [{"fold": f["fold"], "chosen configuration": f"`{f['config']}`", "score on fold": _fmt(f["score"])}
             for f in best["nested_folds"]])))
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
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report

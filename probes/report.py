"""``report.md``, ``report.html`` and the figures of a finished sweep directory (``folds.csv``,
``summary.csv``, ...).

Stores are named by their label everywhere (:func:`probes.names.store_label`): a random-init
control or a padded-recipe store says so in every table, title and legend. Their provenance comes
from the sweep's ``stores.json`` (written when the sweep ran), or, for an older sweep directory,
from the store files named in ``sweep.json`` where they still exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from probes import plots
from probes import selection as S
from probes.html import write_html
from probes.names import BASELINES
from probes.provenance import labels as provenance_labels
from probes.provenance import provenance_table, store_provenance
from probes.tables import fmt as _fmt
from probes.tables import markdown_image
from probes.tables import markdown_table as _md_table
from probes.tables import write_text

#: file names next to the sweep's tables
MARKDOWN, HTML, STORES = "report.md", "report.html", "stores.json"


def _read(out_dir: Path, name: str) -> pd.DataFrame:
    path = out_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} holds no {name}: is it a sweep output directory?")
    return pd.read_csv(path, dtype={"layer": str}, keep_default_na=True)


def sweep_provenance(out_dir: Path, stores: list[str]) -> dict[str, dict]:
    """``{store name: provenance}`` of a sweep directory's stores: ``stores.json`` where the sweep
    wrote it, else read from the store files of ``sweep.json`` (a store not found there gets only
    its name, and a note saying so)."""
    path = out_dir / STORES
    if path.exists():
        try:
            recs = json.loads(path.read_text())
            if isinstance(recs, dict):
                return {st: recs.get(st, {"name": st, "label": st, "error": f"not in {STORES}"}) for st in stores}
        except ValueError:
            pass
    paths = {}
    settings = out_dir / "sweep.json"
    if settings.exists():
        try:
            paths = {Path(p).stem: Path(p) for p in json.loads(settings.read_text()).get("stores", [])}
        except (ValueError, AttributeError):
            paths = {}
    out = {}
    for st in stores:
        p = paths.get(st)
        out[st] = store_provenance(p, st) if p is not None and p.exists() else {
            "name": st, "label": st, "tags": [],
            "error": f"no {STORES} in the sweep directory and the store file is not at its recorded path"}
    return out


def _headline_lines(entry: dict, baselines: dict, labels: dict) -> list[str]:
    h, o = entry["headline"], entry["other_folds"]
    name = ("Nested-CV balanced accuracy" if h["method"] == S.NESTED
            else "Balanced accuracy, selection on other outer folds (not nested)")
    lines = [f"**{name}: {_fmt(h['bacc'])}** — {h['description']}."]
    stores = h.get("stores") or list(baselines)
    base = [f"{labels.get(st, st)}: majority {_fmt(baselines[st]['majority_bacc'])}, chance "
            f"{_fmt(baselines[st]['chance_bacc'])}" for st in stores if st in baselines]
    if base:
        lines += ["", "Baselines of the same folds — " + "; ".join(base) + "."]
    if h["method"] == S.NESTED:
        lines += ["", f"For comparison, {o['description']}: {_fmt(o['bacc'])}."]
    if h.get("folds"):
        lines += ["", "Choices per outer fold:", "",
                  _md_table(pd.DataFrame([{"fold": f["fold"], "chosen configuration": f"`{f['config']}`",
                                           "selection score": _fmt(f["selection_score"]),
                                           "score on fold": _fmt(f["score"])} for f in h["folds"]]))]
    return lines


def _best(out_dir: Path, folds: pd.DataFrame) -> dict:
    best_path = out_dir / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    if "per_store" not in best:  # an older sweep directory: only the not-nested selection can be recomputed
        fp = folds[~folds["probe"].isin(BASELINES)]
        best["per_store"] = {}
        for st, g in fp.groupby("store", sort=False):
            o = S.other_folds_selection(g)
            o["description"] = S.describe(S.OTHER_FOLDS, n_configs=int(g["config"].nunique()))
            o["stores"] = [st]
            best["per_store"][st] = {"headline": o, "other_folds": o}
        if len(best["per_store"]) == 1:
            best.update(next(iter(best["per_store"].values())))
    return best


def write_report(out_dir: str | os.PathLike, top: int = 10) -> Path:
    """Write the figures (PNG), ``report.md`` and ``report.html`` into ``out_dir``; return the
    markdown report's path (the HTML page is beside it)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {out_dir}")
    summary = _read(out_dir, "summary.csv")
    folds = _read(out_dir, "folds.csv")
    preds_path = out_dir / "predictions.csv"
    probes_only = summary[~summary["probe"].isin(BASELINES)]
    if probes_only.empty:
        raise ValueError(f"{out_dir}/summary.csv holds no probe results")
    best = _best(out_dir, folds)
    ranked = probes_only.sort_values(["balanced_accuracy_mean", "config"], ascending=[False, True])
    top_row = ranked.iloc[0]
    naive = best.get("naive_best") or {}
    if naive.get("config") in set(ranked["config"]):  # the sweep's choice (controls are never it)
        top_row = ranked[ranked["config"] == naive["config"]].iloc[0]
    stores = list(dict.fromkeys(summary["store"]))
    prov = sweep_provenance(out_dir, stores)
    labels = provenance_labels(prov)
    base = summary[summary["probe"].isin(BASELINES)]
    baselines = best.get("baselines") or {
        st: {"majority_bacc": float(g.loc[g["probe"] == "majority", "balanced_accuracy_mean"].iloc[0]),
             "chance_bacc": float(g.loc[g["probe"] == "chance", "balanced_accuracy_mean"].iloc[0])}
        for st, g in base.groupby("store", sort=False)}

    images = []
    if len(stores) > 1 and any(len(plots.best_per_layer(summary, st)) for st in stores):
        images.append(("Stores side by side (best configuration per layer)",
                       plots.plot_store_comparison(summary, out_dir / "stores.png", labels)))
    for st in stores:
        suffix = "" if len(stores) == 1 else f"_{st}"
        lab = labels.get(st, st)
        images.append((f"Balanced accuracy per layer — {lab}",
                       plots.plot_layer_curves(summary, out_dir / f"layers{suffix}.png", st, lab)))
        if not plots.heatmap_table(summary, st).empty:
            images.append((f"Layer x pooling — {lab}", plots.plot_heatmap(summary, out_dir / f"heatmap{suffix}.png", st, lab)))
    if preds_path.exists():
        preds = pd.read_csv(preds_path, dtype={"label": str, "pred": str})
        if (preds["config"] == top_row["config"]).any():
            images.append((f"Confusion matrix of the naive best configuration ({labels.get(top_row['store'], top_row['store'])})",
                           plots.plot_confusion(preds, top_row["config"], out_dir / "confusion_best.png",
                                                labels.get(top_row["store"], top_row["store"]))))

    lines = ["# Probe sweep report", ""]
    for st in stores:
        s = summary[summary["store"] == st]
        b = baselines.get(st, {})
        lines.append(f"- store **{labels.get(st, st)}** (encoder `{s['encoder'].iloc[0]}`): {int(s['n_items'].iloc[0])} items; "
                     f"baselines of the same folds: majority {_fmt(b.get('majority_bacc'))}, chance {_fmt(b.get('chance_bacc'))}")
    lines += ["", "## Headline", ""]
    if "headline" in best:
        lines += _headline_lines(best, baselines, labels)
    if best.get("headline_note"):
        lines += ["", f"Note: {best['headline_note']}."]
    if best.get("headline_excludes"):
        lines += ["", f"Note: {S.excludes_note(best['headline_excludes'], labels)}."]
    if "headline" not in best or len(best["per_store"]) > 1:
        for st, entry in best["per_store"].items():
            lines += ["", f"### {labels.get(st, st)}", ""] + _headline_lines(entry, baselines, labels)
    lines += [
        "",
        f"Naive best (the maximum over {len(probes_only)} configurations, scored on the folds that chose it, "
        f"so optimistic): {_fmt(top_row['balanced_accuracy_mean'])} ± {_fmt(top_row['balanced_accuracy_std'])} "
        f"(speaker-bootstrap 95% CI {_fmt(top_row.get('bacc_ci_low'))}–{_fmt(top_row.get('bacc_ci_high'))}), "
        f"`{top_row['config']}`; majority {_fmt(top_row['majority_bacc'])}, chance {_fmt(top_row['chance_bacc'])}.",
    ]
    lines += ["", "## Stores", "", _md_table(provenance_table(prov)), ""]
    cols = {"store": "store", "layer": "layer", "pooling": "pooling", "probe": "probe", "class_weight": "weights"}
    rows = []
    for _, r in ranked.head(top).iterrows():
        row = {v: r[k] for k, v in cols.items()}
        row["store"] = labels.get(r["store"], r["store"])
        row.update({
            "bacc": f"{_fmt(r['balanced_accuracy_mean'])} ± {_fmt(r['balanced_accuracy_std'])}",
            "95% CI": f"{_fmt(r.get('bacc_ci_low'))}–{_fmt(r.get('bacc_ci_high'))}",
            "macro-F1": _fmt(r["macro_f1_mean"]), "AUC": _fmt(r["roc_auc_ovr_mean"]),
            "majority": _fmt(r["majority_bacc"]), "chance": _fmt(r["chance_bacc"]),
        })
        if "sensitivity_mean" in r:
            row.update(sensitivity=_fmt(r["sensitivity_mean"]), specificity=_fmt(r["specificity_mean"]))
        rows.append(row)
    lines += [f"## Best configurations (top {min(top, len(ranked))} by mean balanced accuracy)", "",
              _md_table(pd.DataFrame(rows)), ""]
    lines += ["## Figures", ""]
    for title, path in images:
        lines += [f"### {title}", "", markdown_image(title, Path(path).name), ""]
    text = "\n".join(lines) + "\n"
    md = write_text(text, out_dir / MARKDOWN)
    write_html(text, out_dir / HTML, "Probe sweep report — " + ", ".join(labels.get(st, st) for st in stores))
    return md

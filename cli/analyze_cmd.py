"""`probes analyze`: layer-wise SVCCA / PWCCA / linear CKA against the label and nuisance columns.

Parses the options, calls :func:`probes.analysis.run_analysis`, prints the best layer per method
and target; errors through :mod:`featstore_cli.errors`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .errors import console, csv_list, fail, user_errors


def analyze(
    files: list[Path] = typer.Argument(..., help="One or more stores (.h5); with two or more, the first is compared layer by layer with each other one."),
    target: str = typer.Option("label", "--target", help="items/ column to explain (one-hot encoded)."),
    nuisance: str = typer.Option("group", "--nuisance", help="Comma-separated nuisance columns: group (the speaker), sex, ... ('none' for none)."),
    method: str = typer.Option("svcca,pwcca,cka", "--method", help="Comma-separated: svcca, pwcca (held-out CCA), cka (linear CKA)."),
    pooling: str = typer.Option("mean", "--pooling", help="Per-item pooling with --level pooled: mean, stats, max, center, first, last."),
    scope: str = typer.Option("auto", "--scope", help="auto (the segment where the store has one), clip or segment."),
    level: str = typer.Option("pooled", "--level", help="pooled (one vector per item), center (the centre frame of each item/segment) or frames (every frame)."),
    layers: str = typer.Option("all", "--layers", help="Layers: all, 0-12, 0,4,8, -1 (the last stored layer)."),
    n_boot: int = typer.Option(200, "--n-boot", help="Bootstrap draws over speakers for the 95 % intervals (0: none)."),
    n_shuffle: int = typer.Option(20, "--n-shuffle", help="Permutations of the target for the shuffled floor (0: none)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default cache/analysis/<store name>/)."),
    seed: int = typer.Option(0, "--seed", help="Seed of folds, bootstrap draws and permutations."),
    n_jobs: int = typer.Option(-1, "--n-jobs", help="Processes scoring layers in parallel (-1: all cores)."),
) -> None:
    """Per-layer SVCCA / PWCCA / CKA against the target and nuisances, with shuffled floors,
    speaker-bootstrap intervals, layer-to-layer heatmaps and the target/speaker crossover."""
    from featstore.layerspec import parse_layers
    from probes.analysis import run_analysis
    from probes.names import ANALYSIS_METHODS

    methods = csv_list(method)
    bad = [m for m in methods if m not in ANALYSIS_METHODS]
    if bad or not methods:
        fail(f"--method: unknown {', '.join(map(repr, bad)) or '(empty)'}; use {', '.join(ANALYSIS_METHODS)}")
    nuisances = [] if nuisance.strip().lower() in ("", "none") else csv_list(nuisance)
    if n_boot < 0 or n_shuffle < 0:
        fail("--n-boot and --n-shuffle must be 0 or more")
    with user_errors(prefix="--layers: "):
        spec = parse_layers(layers)
    with user_errors():
        res = run_analysis(files, target, nuisances, methods, level, pooling, scope, spec, n_boot, n_shuffle, out,
                           seed, n_jobs=n_jobs, log=lambda s: console.print(f"[dim]{escape(s)}[/]"))
    _print_summary(res)


def _print_summary(res) -> None:
    p = res.profile
    table = Table(title="best layer per method and target", show_lines=False)
    for col in ("store", "method", "target", "layer", "score [95% CI]", "shuffled"):
        table.add_column(col, no_wrap=col == "store")
    real, floor = p[~p.shuffled], p[p.shuffled]
    for (store, method, tgt), e in real.groupby(["store", "method", "target"], sort=False):
        if not e.score.notna().any():
            continue
        best = e.loc[e.score.idxmax()]
        f = floor[(floor.store == store) & (floor.method == method) & (floor.target == tgt)
                  & (floor.layer == best.layer)]
        table.add_row(escape(res.label(str(store))), method, escape(str(tgt)), str(int(best.layer)),
                      f"{best.score:.3f} [{best.ci_low:.3f}, {best.ci_high:.3f}]",
                      f"{f.score.iloc[0]:.3f}" if len(f) else "-")
    console.print(table)
    console.print(f"[green]wrote[/] {len(res.files)} files to {escape(str(res.out))} (profile.csv, analysis.md, report.html, plots)")

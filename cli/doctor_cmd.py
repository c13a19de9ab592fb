"""`probes doctor FILE`: run the expert's debugging order on a store (registered by the probes app).

Thin: parse the options, call :func:`probes.doctor.run_doctor` (which writes the report), print
the summary table. Exit 1 when a step fails, 2 on a usage error (one line, no traceback).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import user_errors


def doctor(
    file: Path = typer.Argument(..., help="The store (.h5) to check."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="An acoustic store of the same items (e.g. log-Mel) to compare with in the layer profile."),
    padded: Optional[Path] = typer.Option(None, "--padded", help="A store of the same items written by the common padded recipe (featstore extract --emulate-padding): measured in the padding step instead of the simulation."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder for doctor.md, doctor.json and figures (default cache/doctor/<store name>/)."),
    layers: str = typer.Option("all", "--layers", help="Layers to screen: all, 0-12, 0-3,6."),
    n_permutations: int = typer.Option(100, "--n-permutations", help="Label shuffles for the confound tests, the label-shift test and the shuffle control."),
    cv: int = typer.Option(5, "--cv", help="Speaker-grouped folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of folds, shuffles and probes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Print each step as it starts."),
) -> None:
    """Check a store step by step (data, confounds, folds, features and label alignment, shuffle
    control, padding, layers, class weighting); exit 1 when a step fails."""
    from featstore.layerspec import parse_layers
    from probes.doctor import run_doctor, summary_table

    with user_errors("--layers: "):
        spec = parse_layers(layers)
    with user_errors():
        report = run_doctor(file, baseline=baseline, padded=padded, out_dir=out, layers=spec,
                            n_permutations=n_permutations, cv=cv, seed=seed, progress=progress)
    out_console = Console() if Console().is_terminal else Console(width=160)
    out_console.print(summary_table(report))
    verdict = (f"[bold red]{len(report.failed)} step(s) failed[/]: " + ", ".join(s.name for s in report.failed)
               if report.failed else "[green]no step failed[/]")
    out_console.print(f"{verdict}; report: {report.out_dir / 'doctor.md'} and {report.out_dir / 'report.html'}",
                      highlight=False)
    raise typer.Exit(report.exit_code)

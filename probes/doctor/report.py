"""Output of a doctor run: ``doctor.md``, ``doctor.json``, the layer-profile figure, and the rich
summary table the command line prints."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from probes.doctor.plot import plot_profile
from probes.doctor.result import FAIL, PASS, SKIP, WARN, DoctorReport

STATUS_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def summary_table(report: DoctorReport):
    """A rich Table: step, status, evidence (the message), advice."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"probes doctor: {Path(report.store).name}", show_lines=True, expand=False)
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("status")
    table.add_column("evidence", overflow="fold", ratio=3)
    table.add_column("advice", overflow="fold", ratio=2)
    for i, s in enumerate(report, 1):
        style = STATUS_STYLE.get(s.status, "")
        status = f"[{style}]{s.status.upper()}[/]" + (f"\n[dim](after {escape(s.caused_by)})[/]" if s.caused_by else "")
        table.add_row(str(i), s.name, status, escape(s.message), escape(s.advice))
    return table


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(report: DoctorReport, out_dir: str | Path) -> Path:
    """Write ``doctor.md``, ``doctor.json`` and the figures into ``out_dir``; return the md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.out_dir = out
    p = plot_profile(report.profile, report.store, out / "layer_profile.png")
    if p is not None:
        report.figures["layer_profile"] = p
    failed = report.failed
    lines = [f"# probes doctor: `{Path(report.store).name}`", "",
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
             f"{'**FAILED** ' + ', '.join(s.name for s in failed) if failed else 'no step failed'}; "
             f"{report.seconds:.1f} s.", ""]
    if report.padded:
        lines += [f"Padded store (measured padding comparison): `{report.padded}`.", ""]
    if report.best:
        b = report.best
        lines += [f"Best configuration: layer {b['layer']}, {b['pooling']} pooling ({b['scope']}), logreg balanced "
                  f"accuracy {b['balanced_accuracy']:.3f} (chance {b['chance']:.3f}).", ""]
    lines += ["| # | step | status | evidence | advice |", "|---|---|---|---|---|"]
    for i, s in enumerate(report, 1):
        status = f"**{s.status}**" + (f" (after {s.caused_by})" if s.caused_by else "")
        lines.append(f"| {i} | {s.name} | {status} | {_cell(s.message)} | {_cell(s.advice)} |")
    lines.append("")
    for name, fig in report.figures.items():
        lines += [f"![{name}]({fig.name})", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += ["## Evidence", ""]
    for i, s in enumerate(report, 1):
        lines += [f"### {i}. {s.name}: {s.status}", "", "```json", json.dumps(s.evidence, indent=1), "```", ""]
    md = out / "doctor.md"
    md.write_text("\n".join(lines))
    (out / "doctor.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return md

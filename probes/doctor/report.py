"""Output of a doctor run: ``doctor.md``, ``report.html`` (the same report as one self-contained
page), ``doctor.json``, the layer-profile figure, and the rich summary table the command line
prints. Stores are named by :func:`probes.names.store_label` (a control or a padded-recipe store
says so) and their provenance is listed."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from probes.doctor.result import FAIL, PASS, SKIP, WARN, DoctorReport
from probes.html import write_html
from probes.plots import plot_doctor_profile
from probes.provenance import provenance_table, store_provenance
from probes.tables import markdown_image, markdown_table, write_text

STATUS_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def summary_table(report: DoctorReport):
    """A rich Table: step, status, evidence (the message), advice."""
    from rich.markup import escape
    from rich.table import Table

    label = store_provenance(report.store)["label"]
    table = Table(title=escape(f"probes doctor: {label}"), show_lines=True, expand=False)
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


def _provenance(report: DoctorReport) -> dict[str, dict]:
    """``{role: provenance}`` of the checked store and of the baseline and padded stores given."""
    out = {"store": store_provenance(report.store)}
    for role, path in (("baseline", report.baseline), ("padded", report.padded)):
        if path:
            out[role] = store_provenance(path)
    return out


def _headline(report: DoctorReport, labels: dict[str, str]) -> list[str]:
    b = report.best
    lines = [f"**Best configuration: layer {b['layer']}, {b['pooling']} pooling ({b['scope']}), logreg balanced "
             f"accuracy {b['balanced_accuracy']:.3f}** (chance {b['chance']:.3f}"]
    prof = report.profile or {}
    null_hi = prof.get("null_hi")
    if null_hi is not None and null_hi == null_hi:
        lines[0] += f"; shuffled labels, 95th percentile {null_hi:.3f}"
    if prof.get("baseline"):
        lines[0] += f"; baseline {labels.get('baseline', prof['baseline']['name'])} {prof['baseline']['score']:.3f}"
    n = len(prof.get("layers", [])) * 2
    lines[0] += ")."
    lines += ["", f"What this number is: the configuration is chosen by the screen probe among {n or 'the'} "
              "layer x pooling configurations and scored by logistic regression on the same speaker-grouped folds "
              "(out of fold, but not nested CV, so optimistic); `probes sweep` gives the nested-CV headline."]
    return lines


def write_report(report: DoctorReport, out_dir: str | Path) -> Path:
    """Write ``doctor.md``, ``report.html``, ``doctor.json`` and the figures into ``out_dir``;
    return the md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.out_dir = out
    prov = _provenance(report)
    labels = {role: p["label"] for role, p in prov.items()}
    p = plot_doctor_profile(report.profile, labels["store"], out / "layer_profile.png", labels.get("baseline"))
    if p is not None:
        report.figures["layer_profile"] = p
    failed = report.failed
    lines = [f"# probes doctor: {labels['store']}", "",
             f"`{Path(report.store).name}`; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
             f"{'**FAILED** ' + ', '.join(s.name for s in failed) if failed else 'no step failed'}; "
             f"{report.seconds:.1f} s.", ""]
    if report.padded:
        lines += [f"Padded store (measured padding comparison): `{report.padded}` ({labels['padded']}).", ""]
    if report.baseline:
        lines += [f"Baseline store: `{report.baseline}` ({labels['baseline']}).", ""]
    if report.best:
        lines += ["## Headline", ""] + _headline(report, labels) + [""]
    lines += ["## Steps", "", "| # | step | status | evidence | advice |", "|---|---|---|---|---|"]
    for i, s in enumerate(report, 1):
        status = f"**{s.status}**" + (f" (after {s.caused_by})" if s.caused_by else "")
        lines.append(f"| {i} | {s.name} | {status} | {_cell(s.message)} | {_cell(s.advice)} |")
    lines.append("")
    lines += ["## Stores", "", markdown_table(provenance_table(
        [{**p, "label": f"{p['label']} ({role})" if role != "store" else p["label"]} for role, p in prov.items()])), ""]
    if report.figures:
        lines += ["## Figures", ""]
    for name, fig in report.figures.items():
        lines += [markdown_image(name, fig.name), ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += ["## Evidence", ""]
    for i, s in enumerate(report, 1):
        lines += [f"### {i}. {s.name}: {s.status}", "", "```json", json.dumps(s.evidence, indent=1), "```", ""]
    text = "\n".join(lines)
    md = write_text(text, out / "doctor.md")
    write_html(text, out / "report.html", f"probes doctor — {labels['store']}")
    (out / "doctor.json").write_text(json.dumps({**report.to_dict(), "provenance": prov}, indent=1, default=str))
    return md

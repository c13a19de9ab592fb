"""``report.html`` of the sweep, the doctor and the analysis: one self-contained page (parsed with
the standard library's html.parser) holding every figure (embedded PNG, byte-identical to the file
beside it) and every table of the markdown report, the headline with its baselines and what the
headline is, and each store's provenance; plus the control / padded labels in the printed tables.
"""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from featstore_cli.analyze_cmd import analyze
from featstore_cli.probes_app import app as probes_app
from probes.html import render
from probes.tables import fmt
from tests.labelled_stores import CONTROL, CREATED, MANIFEST, PADDED, write_store
from tests.test_plots import make_run

runner = CliRunner()
CONTROL_NAME, PADDED_NAME = "control [random-init control]", "padded [padded to 1.0 s]"


class Page(HTMLParser):
    """Tags, image sources, tables (as lists of rows of cell texts), headings and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self.chunks: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(text)
        self.text = " ".join("".join(self.chunks).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h1", "h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        self.chunks.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        for t in self.tables:
            if t and t[0] and t[0][0] == first_header:
                return t
        raise AssertionError(f"no table headed {first_header!r}; tables: {[t[0] for t in self.tables if t]}")


def parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def assert_self_contained(page: Page) -> None:
    names = [t for t, _ in page.tags]
    assert "script" not in names and "link" not in names and "iframe" not in names
    assert "style" in names
    for tag, attrs in page.tags:
        for key, value in attrs.items():
            v = (value or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "file:")), (tag, key, value)
    style = "".join(c for c in page.chunks if "{" in c)
    assert "@import" not in style and "url(" not in style


def assert_figures(page: Page, md_text: str, folder: Path) -> None:
    """Every figure the markdown references is embedded, as the very bytes of its PNG."""
    refs = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(([^)]+)\)", md_text)
    assert refs and len(page.images) == len(refs)
    for src, ref in zip(page.images, refs):
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1]) == (folder / ref).read_bytes()


def md_tables(md_text: str) -> int:
    return sum(1 for line in md_text.splitlines() if re.fullmatch(r"\|(---\|)+", line.strip()))


def row_of(table: list[list[str]], first: str) -> dict[str, str]:
    head = table[0]
    for row in table[1:]:
        if row[0] == first:
            return dict(zip(head, row))
    raise AssertionError(f"no row {first!r} in {[r[0] for r in table]}")


def assert_provenance(table: list[list[str]], name: str, control: str, padding: str, layers: str) -> None:
    row = row_of(table, name)
    assert row["encoder"] == "tiny-encoder" and row["revision"] == "rev-0123abcd"
    assert row["control"] == control and row["padding"] == padding and row["layers"] == layers
    assert row["manifest sha256"] == MANIFEST and row["created"] == CREATED
    assert row["versions"] == "featstore 0.test, torch 2.13.0"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return make_run(tmp_path_factory.mktemp("html"), [0, 1, 2], nested="auto", doctor_padded=True)


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------
def test_sweep_report_html(run):
    out = run["sweep"].out_dir
    page, md = parse(out / "report.html"), (out / "report.md").read_text()
    assert_self_contained(page)
    assert_figures(page, md, out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(page.images) == len(pngs) == 8  # stores, 3 x layers, 3 x heatmap, confusion
    assert len(page.tables) == md_tables(md) >= 3
    best = run["sweep"].best
    h = best["headline"]
    assert h["method"] == "nested"
    assert f"Nested-CV balanced accuracy: {fmt(h['bacc'])}" in page.text
    assert "true nested CV: the configuration is chosen among 6 configurations by 3-fold inner CV" in page.text
    assert "chosen among trained, padding-exact stores only" in page.text  # the control and the padded store are not candidates
    assert "selection on other outer folds — not nested" in page.text
    for store, b in best["baselines"].items():
        label = {"control": CONTROL_NAME, "padded": PADDED_NAME}.get(store, store)
        assert f"{label}: majority {fmt(b['majority_bacc'])}, chance {fmt(b['chance_bacc'])}" in page.text
    stores = page.table("store")  # the provenance table comes first
    assert_provenance(stores, "trained", "no (trained weights)", "padding-exact", "3 (0-2)")
    assert_provenance(stores, CONTROL_NAME, "random-init control, seed 7", "padding-exact", "3 (0-2)")
    assert_provenance(stores, PADDED_NAME, "no (trained weights)", "padded to 1.0 s", "3 (0-2)")
    configs = [t for t in page.tables if t[0][:2] == ["store", "layer"]]
    assert len(configs) == 1 and {r[0] for r in configs[0][1:]} <= {"trained", CONTROL_NAME, PADDED_NAME}
    assert f"Balanced accuracy per layer — {CONTROL_NAME}" in page.headings
    assert f"Layer x pooling — {PADDED_NAME}" in page.headings


def test_sweep_stores_json_keeps_provenance_for_later_reports(run, tmp_path):
    """`probes report` on a copy of the sweep directory, far from the store files."""
    import shutil

    copy = tmp_path / "moved"
    shutil.copytree(run["sweep"].out_dir, copy)
    rec = json.loads((copy / "stores.json").read_text())
    assert rec["control"]["label"] == CONTROL_NAME and rec["control"]["random_init_seed"] == 7
    assert rec["padded"]["padding_exact"] is False and rec["padded"]["tags"] == ["padded to 1.0 s"]
    for p in copy.glob("report.*"):
        p.unlink()
    res = runner.invoke(probes_app, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    page = parse(copy / "report.html")
    assert_provenance(page.table("store"), CONTROL_NAME, "random-init control, seed 7", "padding-exact", "3 (0-2)")


def test_sweep_cli_html_not_nested_and_labelled_summary(tmp_path):
    ctl = write_store(tmp_path / "whisper.h5", [0, 1], CONTROL, cue={}, seed=5)
    out = tmp_path / "sw"
    res = runner.invoke(probes_app, ["sweep", str(ctl), "--probe", "logreg", "--pooling", "mean", "--class-weight",
                                     "none", "--cv", "3", "--n-jobs", "1", "--nested", "off", "--n-boot", "20",
                                     "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    # the printed summary table names the one store as a control (a store column although one store)
    assert "whisper [random-init control]" in res.output
    assert re.search(r"whisper \[random-init control\]: headline balanced accuracy", res.output)
    assert str(out / "report.html") in res.output.replace("\n", "")
    page = parse(out / "report.html")
    assert_self_contained(page)
    best = json.loads((out / "best.json").read_text())
    assert f"Balanced accuracy, selection on other outer folds (not nested): {fmt(best['headline']['bacc'])}" in page.text
    assert "Nested-CV" not in page.text
    assert row_of(page.table("store"), "whisper [random-init control]")["control"] == "random-init control, seed 7"


def test_multi_store_summary_table_names_control_and_padded(tmp_path):
    a = write_store(tmp_path / "wavlm.h5", [0, 1], PADDED, seed=6)
    b = write_store(tmp_path / "whisper.h5", [0, 1], CONTROL, seed=7)
    res = runner.invoke(probes_app, ["sweep", str(a), str(b), "--probe", "logreg", "--pooling", "mean",
                                     "--class-weight", "none", "--cv", "3", "--n-jobs", "1", "--nested", "off",
                                     "--n-boot", "20", "--out", str(tmp_path / "o"), "--no-progress", "--no-report"])
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("Best configurations"):]
    assert "wavlm [padded to 1.0 s]" in table and "whisper [random-init control]" in table
    assert "wavlm [padded to 1.0 s]: majority" in res.output


# ---------------------------------------------------------------------------------------------
# the doctor
# ---------------------------------------------------------------------------------------------
def test_doctor_report_html(run):
    rep = run["doctor"]
    out = rep.out_dir
    page, md = parse(out / "report.html"), (out / "doctor.md").read_text()
    assert_self_contained(page)
    assert_figures(page, md, out)
    assert len(page.images) == 1 and len(page.tables) == md_tables(md) == 2
    steps = page.table("#")
    assert [r[1] for r in steps[1:]] == [s.name for s in rep]
    assert [r[2].split()[0] for r in steps[1:]] == [s.status for s in rep]
    b = rep.best
    assert (f"Best configuration: layer {b['layer']}, {b['pooling']} pooling ({b['scope']}), logreg balanced "
            f"accuracy {b['balanced_accuracy']:.3f}") in page.text
    assert f"chance {b['chance']:.3f}" in page.text and "shuffled labels, 95th percentile" in page.text
    assert "not nested CV" in page.text
    stores = page.table("store")
    assert_provenance(stores, "trained", "no (trained weights)", "padding-exact", "3 (0-2)")
    assert_provenance(stores, f"{CONTROL_NAME} (baseline)", "random-init control, seed 7", "padding-exact", "3 (0-2)")
    assert_provenance(stores, f"{PADDED_NAME} (padded)", "no (trained weights)", "padded to 1.0 s", "3 (0-2)")
    assert f"Padded store (measured padding comparison): `{rep.padded}` ({PADDED_NAME})" in md
    assert json.loads((out / "doctor.json").read_text())["provenance"]["baseline"]["label"] == CONTROL_NAME


def test_doctor_cli_names_the_control(tmp_path):
    ctl = write_store(tmp_path / "whisper.h5", [0, 1], CONTROL, seed=8)
    res = runner.invoke(probes_app, ["doctor", str(ctl), "--n-permutations", "3", "--cv", "3", "--no-progress",
                                     "--out", str(tmp_path / "d")])
    assert res.exit_code in (0, 1), res.output
    assert "probes doctor: whisper [random-init control]" in res.output
    assert (tmp_path / "d" / "report.html").exists() and "report.html" in res.output
    assert parse(tmp_path / "d" / "report.html").headings[0] == "probes doctor: whisper [random-init control]"


# ---------------------------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------------------------
def test_analysis_report_html(run):
    res = run["analysis"]
    out = res.out
    page, md = parse(out / "report.html"), (out / "analysis.md").read_text()
    assert_self_contained(page)
    assert_figures(page, md, out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(page.images) == len(pngs) == 2 + 3  # two profiles, three pairs x one method (cka)
    assert len(page.tables) == md_tables(md) == 3  # stores + one per store
    p = res.profile
    best = p[(p.store == "control") & (p.method == "cka") & (p.target == "label") & ~p.shuffled].sort_values("score").iloc[-1]
    assert (f"{CONTROL_NAME}, target label: cka {fmt(best.score)} [{fmt(best.ci_low)}, {fmt(best.ci_high)}] "
            f"at layer {int(best.layer)} (shuffled floor") in page.text
    assert "a maximum over layers, not a cross-validated choice" in page.text
    assert_provenance(page.table("store"), CONTROL_NAME, "random-init control, seed 7", "padding-exact", "3 (0-2)")
    assert f"Layer profile — {CONTROL_NAME}" in page.headings


def test_analyze_cli_table_names_the_control(run):
    app = typer.Typer()
    app.command("analyze")(analyze)

    @app.callback()
    def main() -> None:
        pass

    root = run["root"]
    res = runner.invoke(app, ["analyze", str(root / "control.h5"), "--method", "cka", "--n-boot", "3",
                              "--n-shuffle", "2", "--n-jobs", "1", "--out", str(root / "an2")])
    assert res.exit_code == 0, res.output
    assert "control [random-init control]" in res.output and "report.html" in res.output
    assert (root / "an2" / "report.html").exists()


# ---------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------
def test_render_escapes_html_and_marks_a_missing_figure(tmp_path):
    page_text, missing = render("# t <b>x</b>\n\n<script>alert(1)</script>\n\n![gone](gone.png)\n", tmp_path, "t")
    page = Page(page_text)
    assert missing == ["gone.png"]
    assert "script" not in [t for t, _ in page.tags] and "b" not in [t for t, _ in page.tags]
    assert "<script>alert(1)</script>" in page.text
    assert "figure file gone.png is missing" in page.text

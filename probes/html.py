"""``report.html``: one self-contained page made from a report's markdown.

Every report (sweep, doctor, analysis) is written once, as markdown; :func:`write_html` renders
that same text with ``markdown-it-py`` (CommonMark plus tables; raw HTML in the text is escaped),
embeds every figure the markdown references as a base64 ``data:`` URI, and adds an inline style
sheet. The page loads nothing from anywhere: no external CSS, scripts or fonts, so it opens
offline and can be mailed as one file.
"""
from __future__ import annotations

import base64
import html
import os
from datetime import datetime, timezone
from pathlib import Path

from probes.tables import write_text

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d1d1f; background: #fff; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 1.2rem 1.6rem 3rem; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
p, li { max-width: 80em; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .88em; background: #f3f4f6;
       padding: 0 .25em; border-radius: 3px; overflow-wrap: anywhere; }
pre { background: #f6f8fa; padding: .6rem .8rem; overflow-x: auto; font-size: .8rem; border-radius: 4px; }
pre code { background: none; padding: 0; }
.table { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .84rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; display: block; margin: .4rem 0 1.2rem; border: 1px solid #eee; }
.missing { color: #b00020; font-weight: bold; }
footer { color: #666; font-size: .8rem; margin-top: 3rem; }
"""


def _markdown():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _data_uri(path: Path) -> str | None:
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _embed(tokens, base_dir: Path, missing: list[str]) -> None:
    for tok in tokens:
        if tok.children:
            _embed(tok.children, base_dir, missing)
        if tok.type != "image":
            continue
        src = str(tok.attrGet("src") or "")
        if src.startswith("data:"):
            continue
        uri = _data_uri(base_dir / src) if "://" not in src else None
        if uri is None:
            missing.append(src)
            tok.attrSet("class", "missing")
        else:
            tok.attrSet("src", uri)


def render(markdown_text: str, base_dir: str | os.PathLike, title: str) -> tuple[str, list[str]]:
    """The page for ``markdown_text`` (figures read from ``base_dir``), and the figure files it
    references that could not be embedded (left as their alt text, marked missing)."""
    md = _markdown()
    env: dict = {}
    tokens = md.parse(markdown_text, env)
    missing: list[str] = []
    _embed(tokens, Path(base_dir), missing)
    body = md.renderer.render(tokens, md.options, env)
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    for src in missing:
        body += f'<p class="missing">figure file {html.escape(src)} is missing from {html.escape(str(base_dir))}</p>\n'
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}"
        f"<footer>Written {stamp}; self-contained: the figures are embedded, nothing is loaded from elsewhere.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )
    return page, missing


def write_html(markdown_text: str, path: str | os.PathLike, title: str) -> Path:
    """Write :func:`render` of ``markdown_text`` to ``path`` (figures read from its folder)."""
    path = Path(path)
    page, _ = render(markdown_text, path.parent, title)
    return write_text(page, path)

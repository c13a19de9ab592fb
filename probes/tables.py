"""The one writer of result tables: CSV, JSON and markdown, for the sweep, the analysis, the report,
``probes predict`` and the doctor.

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written table under its final name, and a reader never sees one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

PathLike = str | os.PathLike


def _atomic_write(path: PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_csv(df: pd.DataFrame, path: PathLike, index: bool = False) -> Path:
    """``df`` as CSV (pandas' format, no index by default)."""
    return _atomic_write(path, df.to_csv(index=index))


def read_csv(path: PathLike, what: str = "table", **kwargs: Any) -> pd.DataFrame:
    """Read a table written by :func:`write_csv`; FileNotFoundError naming ``what`` when absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    return pd.read_csv(path, **kwargs)


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays, paths and sets converted; NaN and inf become null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def write_json(obj: Any, path: PathLike) -> Path:
    """``obj`` as indented JSON (see :func:`jsonable`)."""
    return _atomic_write(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_text(text: str, path: PathLike) -> Path:
    """A text file (a report), written atomically."""
    return _atomic_write(path, text)


def markdown_table(df: pd.DataFrame | Iterable[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    df = df if isinstance(df, pd.DataFrame) else pd.DataFrame(list(df))
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def fmt(value: Any, digits: int = 3, missing: str = "–") -> str:
    """A number with ``digits`` decimals (``missing`` for NaN/None); other values as text."""
    if value is None:
        return missing
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return missing if math.isnan(v) else f"{v:.{digits}f}"


def markdown_image(alt: str, target: str) -> str:
    """``![alt](target)`` with the brackets of ``alt`` escaped (store labels hold ``[...]``)."""
    alt = str(alt).replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return f"![{alt}]({target})"

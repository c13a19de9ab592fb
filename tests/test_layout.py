"""The shape of the code: one module per concern, one-way imports, the installed package layout,
and the shared helpers (layer specs, the speaker bootstrap, the table writer)."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featstore.layerspec import LayerSpecError, format_layers, parse_layers, resolve_layers, select_layers

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, relative: bool = True) -> set[str]:
    """Absolute module names a file imports (relative imports resolved inside its package, or left
    out with ``relative=False``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and not relative:
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _modules(folder: str, relative: bool = True) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p, relative) for p in sorted((ROOT / folder).rglob("*.py"))}


def _hits(imports: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports if any(m == b or m.startswith(b + ".") for b in banned))


def test_import_arrows_point_one_way():
    problems = []
    for path, imports in _modules("featstore").items():  # featstore never imports probes or the CLI
        problems += [f"{path} imports {m}" for m in _hits(imports, ("probes", "cli", "featstore_cli"))]
    for path, imports in _modules("probes").items():
        # the library never imports the CLI, and reads stores without extraction code
        problems += [f"{path} imports {m}" for m in _hits(imports, ("cli", "featstore_cli", "featstore.extract",
                                                                     "featstore.encoders"))]
        # lower layers never reach back into the sweep engine
        if not path.endswith("sweep.py"):
            problems += [f"{path} imports {m}" for m in _hits(imports, ("probes.sweep",))]
    for path, imports in _modules("cli", relative=False).items():  # siblings relatively, never as "cli"
        problems += [f"{path} imports {m}" for m in _hits(imports, ("cli",))]
    assert not problems, "\n".join(problems)


def test_one_module_per_concern():
    """The names a newcomer looks for are defined once, in the module named for them."""
    owners = {
        "make_folds": "featstore/cv.py", "inner_folds": "featstore/cv.py", "nested_folds": "featstore/cv.py",
        "fill_groups": "featstore/cv.py", "cca_folds": "featstore/cv.py", "validation_split": "featstore/cv.py",
        "pooled_matrix": "probes/pooling.py", "speaker_draws": "probes/bootstrap.py",
        "nested_selection": "probes/selection.py", "other_folds_selection": "probes/selection.py",
        "write_csv": "probes/tables.py", "markdown_table": "probes/tables.py", "parse_layers": "featstore/layerspec.py",
    }
    defined: dict[str, list[str]] = {}
    names = {"PROBES", "CLASS_WEIGHTS", "BASELINES", "POOLINGS", "SCOPES"}
    assigned: dict[str, list[str]] = {}
    for folder in ("featstore", "probes", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "doctor.py" or "doctor" in path.parts:  # the doctor package merges separately
                continue
            tree = ast.parse(path.read_text())
            rel = str(path.relative_to(ROOT))
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.setdefault(node.name, []).append(rel)
                elif isinstance(node, ast.Assign) and folder != "featstore":  # featstore.finetune has head poolings
                    for t in node.targets:
                        if isinstance(t, ast.Name) and t.id in names:
                            assigned.setdefault(t.id, []).append(rel)
    for name, owner in owners.items():
        if name == "parse_layers":  # probes.sweep keeps a thin entry point that calls it; extract.py's is the lead's
            assert owner in defined[name]
            continue
        assert defined.get(name) == [owner], (name, defined.get(name))
    assert assigned["PROBES"] == ["probes/names.py"] and assigned["BASELINES"] == ["probes/names.py"]
    assert assigned["POOLINGS"] == ["probes/names.py"] and assigned["SCOPES"] == ["probes/names.py"]
    assert not (ROOT / "probes" / "cv.py").exists()


def test_pyproject_installs_the_cli_as_featstore_cli_and_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = cfg["tool"]["setuptools"]
    assert st["package-dir"] == {"featstore_cli": "cli"}
    assert cfg["project"]["scripts"] == {"featstore": "featstore_cli.featstore_app:main",
                                         "probes": "featstore_cli.probes_app:main"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("*/**/__init__.py")
               if p.parent.relative_to(ROOT).parts[0] in ("featstore", "probes")}
    assert on_disk <= set(st["packages"]), sorted(on_disk - set(st["packages"]))
    assert "featstore_cli" in st["packages"] and "cli" not in st["packages"]
    skl = [d for d in cfg["project"]["dependencies"] if d.startswith("scikit-learn")]
    assert skl == ["scikit-learn>=1.8"]  # 1.8.0: StratifiedGroupKFold(shuffle=True) stratifies (PR #32540)


def test_featstore_cli_is_this_checkouts_cli_folder():
    import featstore_cli.probes_app as app

    assert Path(app.__file__).resolve().parent == ROOT / "cli"
    assert "cli" not in sys.modules or Path(getattr(sys.modules["cli"], "__file__", "") or "").parent != ROOT / "cli"


# -- layer specs ----------------------------------------------------------------------------------
def test_layer_specs():
    assert parse_layers("all").every and parse_layers(None).every and parse_layers("0-2,all").every
    assert parse_layers(" ").every
    assert resolve_layers("0-3,6", range(13)) == [0, 1, 2, 3, 6]
    assert resolve_layers("8,0,4,4", [0, 4, 8]) == [0, 4, 8]
    assert resolve_layers("-1", [0, 4, 8]) == [8] and resolve_layers("0,-2", range(13)) == [0, 11]
    assert resolve_layers(5, range(13)) == [5] and resolve_layers([1, "2"], range(13)) == [1, 2]
    assert resolve_layers("all", [0, 4, 8]) == [0, 4, 8]
    assert select_layers("0-5", [0, 4, 8]) == ([0, 4], [1, 2, 3, 5])
    with pytest.raises(LayerSpecError, match=r"layer 5 does not exist: the store has layers 0, 4, 8"):
        resolve_layers("5", [0, 4, 8])
    with pytest.raises(LayerSpecError, match=r"layer -4 does not exist: x.h5 has layers 0..2"):
        resolve_layers("-4", range(3), what="x.h5")
    with pytest.raises(LayerSpecError, match=r"bad layer spec 'a'"):
        parse_layers("0,a")
    with pytest.raises(LayerSpecError, match=r"bad layer range '5-2'"):
        parse_layers("5-2")
    with pytest.raises(LayerSpecError, match="empty layer spec"):
        parse_layers(",,")
    assert format_layers([0, 1, 2]) == "0..2" and format_layers([0, 4, 8]) == "0, 4, 8"


# -- speaker bootstrap --------------------------------------------------------------------------
def test_speaker_bootstrap_resamples_whole_speakers():
    from probes.bootstrap import bootstrap_ci, paired_difference_ci, speaker_codes, speaker_draws
    from probes.metrics import balanced_accuracy

    codes, n = speaker_codes(np.array(["b", "a", "", "b", ""], dtype=object))
    assert n == 4 and codes.tolist() == [3, 2, 0, 3, 1]  # sorted names; each empty group its own speaker
    w = speaker_draws(7, 500, seed=1)
    assert w.shape == (500, 7) and (w.sum(axis=1) == 7).all() and np.allclose(w.mean(axis=0), 1, atol=0.15)
    assert np.array_equal(w, speaker_draws(7, 500, seed=1))
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 4).astype(str)
    y = np.repeat(rng.integers(0, 2, 30), 4)
    a = np.where(rng.random(len(y)) < 0.85, y, 1 - y)
    lo, hi = bootstrap_ci(y, a, groups, 2, n_boot=400)
    assert lo < balanced_accuracy(y, a, 2) < hi
    dlo, dhi = paired_difference_ci(y, a, a, groups, 2, n_boot=100)
    assert dlo == dhi == 0.0  # the same predictions on the same draws differ by exactly 0
    worse = np.where(rng.random(len(y)) < 0.5, 1 - y, y)  # a coin flip per item
    dlo, dhi = paired_difference_ci(y, a, worse, groups, 2, n_boot=400)
    assert 0 < dlo < dhi


# -- the table writer ------------------------------------------------------------------------------
def test_tables_are_written_atomically_and_plainly(tmp_path):
    from probes import tables

    df = pd.DataFrame({"a": [1, 2], "b": ["x|y", "z"]})
    path = tables.write_csv(df, tmp_path / "sub" / "t.csv")
    assert pd.read_csv(path).equals(df) and not list((tmp_path / "sub").glob(".*tmp*"))
    tables.write_json({"v": np.float32(0.5), "n": np.int64(3), "nan": float("nan"), "arr": np.arange(2),
                       "p": tmp_path}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 0.5, "n": 3, "nan": None, "arr": [0, 1],
                                                              "p": str(tmp_path)}
    assert tables.markdown_table(df).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2 | z |"]
    assert tables.fmt(float("nan")) == "–" and tables.fmt(None) == "–" and tables.fmt(0.12345) == "0.123"

"""`probes doctor exact.h5 --padded padded.h5`: the padding step measures a store written by the
common recipe (pad every clip to 1 s, pool over all frames) instead of simulating it.

Both stores are built here: the exact one with the builders of tests/test_doctor.py, the padded
one from its frames with :class:`featstore.store.StoreWriter` (same ids, ``padding_exact=false``,
the recipe in ``padding_recipe``, the padded frames kept as with ``--keep-padding``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.store import OK, StoreWriter, open_store
from probes.doctor import FAIL, PASS, WARN, DoctorError, run_doctor
from tests.test_doctor import FAST, _app, build_store, cue_item

PAD_FRAMES = 49  # 1 s at a 320-sample stride
RECIPE = {"pad_seconds": 1.0, "keep_padding": True}


def padded_copy(exact: Path, out: Path, transform, seed: int = 0, attrs: dict | None = None,
                ids=None) -> Path:
    """A store of the same items whose layer frames are ``transform(rng, frames (L, T, D)) -> (L, T', D)``."""
    rng = np.random.default_rng(seed)
    with open_store(exact) as st:
        items = st.items
        layers = st.layer_ids
        base = {k: v for k, v in st.attrs.items() if k not in ("format", "format_version", "num_layers", "dtype",
                                                               "committed_frames", "num_items")}
        rows, frames = [], []
        for i in range(st.num_items):
            r = items.iloc[i]
            rows.append({c: r[c] for c in ("id", "path", "label", "group", "num_samples", "sha256", "rms_db",
                                            "segment_start_frame", "segment_end_frame")})
            x = np.stack([st.frames(i, k) for k in layers]).astype(np.float64)
            frames.append(np.asarray(transform(rng, x), dtype=np.float32))
        dims = [st.layer_dim(k) for k in layers]
    if ids is not None:
        for r, new in zip(rows, ids):
            r["id"] = new
    attrs = {**base, "padding_exact": False, "padding_recipe": RECIPE, **(attrs or {})}
    writer = StoreWriter.create(out, rows, attrs, dims, layer_ids=layers)
    writer.write_items([(i, {"status": OK}, [f[k] for k in range(len(layers))]) for i, f in enumerate(frames)])
    return writer.finalize()


def keep_padding(pad_vector: np.ndarray):
    """The padded recipe with padding kept: true frames, then ``49 - T`` frames of one vector."""
    def transform(rng, x):
        L, T, D = x.shape
        tail = np.broadcast_to(pad_vector, (L, PAD_FRAMES - T, D)) + 0.01 * rng.normal(size=(L, PAD_FRAMES - T, D))
        return np.concatenate([x, tail], axis=1)
    return transform


def duration_item(cue: float):
    """Clip length follows the label (short/medium/long); every frame of layer 1 carries a label cue
    of strength ``cue`` (so the true-frame mean holds it at any length; a local cue would be diluted
    by long clips, and padding would undo that dilution - an advantage that is not duration)."""
    def item(rng, s, y, j):
        lo, hi = [(4, 9), (8, 15), (14, 24)][y]
        x, ns = cue_item(rng, s, y, j, cue=0.0, frames=(lo, hi - 1))
        x[1] += cue * np.random.default_rng(2000 + y).normal(size=x.shape[2])
        return x, ns
    return item


def doctor(exact, padded, tmp_path, **kw):
    return run_doctor(exact, padded=padded, out_dir=tmp_path / "out", **{**FAST, **kw})


def test_padded_store_winning_only_through_duration_fails(tmp_path):
    exact = build_store(tmp_path / "exact.h5", item=duration_item(cue=0.3))
    padded = padded_copy(exact, tmp_path / "padded.h5", keep_padding(np.full(16, 3.0)))
    report = doctor(exact, padded, tmp_path)
    s = report.step("padding and pooling")
    assert s.status == FAIL, s.message
    ev = s.evidence
    assert ev["padded_source"] == "measured" and ev["padded_items"] == 180
    assert ev["padded_minus_true"] >= 0.05
    assert ev["padded_minus_true_duration_regressed_out"] < 0.05
    assert report.step("confounds").evidence["significant"]["duration"] in (WARN, FAIL)
    assert "the advantage vanishes with duration regressed out of both inside each training fold" in s.message
    assert "pooling over padding encodes clip duration, which predicts the label (duration alone scores" in s.message
    assert "recipe: pad or cut to 1.0 s, padded frames kept" in s.message
    assert "simulated" not in s.message
    if report.step("confounds").status == FAIL:
        assert s.caused_by == "confounds"
    md = (tmp_path / "out" / "doctor.md").read_text()
    assert f"Padded store (measured padding comparison): `{padded}`" in md


def test_padded_advantage_vanishing_without_a_significant_duration_confound_warns(tmp_path):
    # the same stores with 10 shuffles: the smallest p-value is 1/11, so duration alone is not a
    # significant confound and the step cannot blame it - it warns instead
    exact = build_store(tmp_path / "exact.h5", item=duration_item(cue=0.3))
    padded = padded_copy(exact, tmp_path / "padded.h5", keep_padding(np.full(16, 3.0)))
    report = doctor(exact, padded, tmp_path, n_permutations=10)
    assert report.step("confounds").evidence["significant"] == {}
    s = report.step("padding and pooling")
    assert s.status == WARN, s.message
    assert "the advantage vanishes with duration regressed out" in s.message
    assert "although duration alone is not a significant confound" in s.message


def test_padded_store_without_a_duration_advantage_passes(tmp_path):
    # the padded recipe with true frames cut out: frames moved a little, no duration in the mean
    exact = build_store(tmp_path / "exact.h5", item=duration_item(cue=1.5))
    padded = padded_copy(exact, tmp_path / "padded.h5", lambda rng, x: x + 0.1 * rng.normal(size=x.shape),
                         attrs={"padding_recipe": {"pad_seconds": 1.0, "keep_padding": False}})
    s = doctor(exact, padded, tmp_path).step("padding and pooling")
    assert s.status == PASS, s.message
    assert abs(s.evidence["padded_minus_true"]) < 0.05
    assert "true frames cut out after the model" in s.message


def test_padded_advantage_that_survives_without_duration_is_not_blamed_on_duration(tmp_path):
    # lengths independent of the label; the padded store's frames carry a stronger cue
    exact = build_store(tmp_path / "exact.h5", item=lambda rng, s, y, j: cue_item(rng, s, y, j, cue=0.6))
    boost = np.random.default_rng(7).normal(size=(3, 16))
    with open_store(exact) as st:
        labels = st.column("label")
    code = {c: i for i, c in enumerate(sorted(set(labels)))}
    counter = iter(range(len(labels)))

    def sharper(rng, x):
        y = code[labels[next(counter)]]
        return x + 1.5 * boost[y]  # every frame moved towards the item's class

    padded = padded_copy(exact, tmp_path / "padded.h5", sharper)
    s = doctor(exact, padded, tmp_path).step("padding and pooling")
    assert s.status == PASS, s.message
    assert s.evidence["padded_minus_true"] >= 0.05 and s.evidence["padded_minus_true_duration_regressed_out"] >= 0.05
    assert "so the advantage is not (only) duration" in s.message


def test_padded_store_user_errors(tmp_path):
    exact = build_store(tmp_path / "exact.h5")
    with pytest.raises(DoctorError, match="no padded store at"):
        doctor(exact, tmp_path / "missing.h5", tmp_path)
    with pytest.raises(DoctorError, match=r"--padded: .* is padding-exact \(padding_exact=true\)"):
        doctor(exact, exact, tmp_path)
    other = padded_copy(exact, tmp_path / "other.h5", keep_padding(np.zeros(16)), ids=[f"x{i}" for i in range(180)])
    with pytest.raises(DoctorError, match="the padded store .* shares only 0 of 180 item ids"):
        doctor(exact, other, tmp_path)


def test_cli_padded_option(tmp_path):
    exact = build_store(tmp_path / "exact.h5", item=duration_item(cue=0.3))
    padded = padded_copy(exact, tmp_path / "padded.h5", keep_padding(np.full(16, 3.0)))
    runner = CliRunner()
    args = ["--cv", "3", "--n-permutations", "20", "--no-progress"]
    res = runner.invoke(_app(), [str(exact), "--padded", str(padded), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 1, res.output
    assert "padding and pooling" in res.output and "FAIL" in res.output
    data = json.loads((tmp_path / "o" / "doctor.json").read_text())
    assert data["padded"] == str(padded)
    res = runner.invoke(_app(), [str(exact), "--padded", str(exact), *args])
    assert res.exit_code == 2 and "is padding-exact" in res.output and "Traceback" not in res.output
    res = runner.invoke(_app(), [str(exact), "--padded", str(tmp_path / "nope.h5"), *args])
    assert res.exit_code == 2 and "no padded store at" in res.output


def test_padded_store_collapse_warns(tmp_path):
    # 80 % of the speakers in one class; the padded store's frames are padding only: its probe
    # predicts the majority class for nearly every item
    design = [(s, 0 if s < 24 else 1 + s % 2) for s in range(30) for _ in range(6)]
    exact = build_store(tmp_path / "exact.h5", design=design, item=lambda r, s, y, j: cue_item(r, s, y, j, cue=3.0))
    padded = padded_copy(exact, tmp_path / "padded.h5",
                         lambda rng, x: np.full((x.shape[0], PAD_FRAMES, x.shape[2]), 1.0) + rng.normal(size=(x.shape[0], PAD_FRAMES, x.shape[2])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = doctor(exact, padded, tmp_path).step("padding and pooling")
    assert s.status == WARN, s.message
    assert "padded pooling collapses: it predicts 'Normal'" in s.message
    assert s.evidence["largest_predicted_share"]["padded"] > 0.9

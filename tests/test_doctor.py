"""`probes doctor`: the package API, a healthy store that passes every step, the report files, the
command line, and the store builders the other doctor tests use (tests/test_doctor_checks.py: one
store per check; tests/test_doctor_padded.py: the measured padding step).

Stores are tiny (30 speakers x 6 items, 3-4 layers x 16 dims), folds 3, permutations 20.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from featstore.fakestore import write_fake_store
from featstore.store import StoreWriter
from probes.doctor import FAIL, PASS, SKIP, STEPS, WARN, DoctorError, lda_cv_predict, run_doctor

FAST = dict(n_permutations=20, cv=3, progress=False)
CLASSES = ("Normal", "Lateral", "Interdental")


# ---------------------------------------------------------------------------------------------
# Store builders
# ---------------------------------------------------------------------------------------------
def healthy(path: Path, **kw) -> Path:
    args = dict(n_speakers=30, items_per_speaker=6, num_layers=4, dim=16, informative_layers=(2,), seed=0)
    return write_fake_store(path, **{**args, **kw})


def cue_item(rng, s, y, j, num_layers: int = 3, dim: int = 16, cue: float = 2.0, speaker: float = 0.5,
             frames: tuple[int, int] = (4, 12)):
    """Noise + a speaker offset in every layer + a label cue on the centre frames of layer 1."""
    t = int(rng.integers(frames[0], frames[1] + 1))
    x = rng.normal(size=(num_layers, t, dim)) + speaker * np.random.default_rng(1000 + s).normal(size=(num_layers, 1, dim))
    x[1, max(0, t // 2 - 1): t // 2 + 1] += cue * np.random.default_rng(2000 + y).normal(size=dim)
    return x, 320 * t + 80


def build_store(path: Path, n_speakers: int = 30, items_per_speaker: int = 6, num_layers: int = 3, dim: int = 16,
                item=None, seed: int = 0, attrs: dict | None = None, design=None, order=None,
                extra: dict | None = None) -> Path:
    """A store whose items come from ``item(rng, speaker, label, j) -> (frames (L, T, D), num_samples)``
    (default :func:`cue_item`).

    ``design``: ``(speaker, label index)`` per item; default ``n_speakers x items_per_speaker`` items,
    every speaker with one label (classes cycle over speakers). ``order``: the stored order of the
    items (a permutation; default as designed). ``extra``: ``{column: f(speaker, label, j) -> str}``.
    """
    rng = np.random.default_rng(seed)
    if design is None:
        design = [(s, s % len(CLASSES)) for s in range(n_speakers) for _ in range(items_per_speaker)]
    item = item or (lambda r, s, y, j: cue_item(r, s, y, j, num_layers, dim))
    rows, frames, seen = [], [], {}
    for s, y in design:
        j = seen[s] = seen.get(s, -1) + 1
        x, ns = item(rng, s, y, j)
        x = np.asarray(x, dtype=np.float32)
        row = {"id": f"spk{s:03d}_{j:03d}", "path": f"x/{s}_{j}.wav", "label": CLASSES[y],
               "group": f"spk{s:03d}", "num_samples": int(ns), "segment_start_frame": -1,
               "segment_end_frame": -1, "sha256": hashlib.sha256(x.tobytes() + bytes([s % 256, j % 256])).hexdigest(),
               "rms_db": float(-20 - rng.random() * 10)}
        row.update({c: f(s, y, j) for c, f in (extra or {}).items()})
        rows.append(row)
        frames.append([x[k] for k in range(num_layers)])
    if order is not None:
        rows, frames = [rows[i] for i in order], [frames[i] for i in order]
    base = {"encoder": "test", "encoder_revision": "", "encoder_config": {}, "sample_rate": 16000,
            "frame_stride_samples": 320, "receptive_field_samples": 400, "first_frame_center_samples": 200.0,
            "manifest_sha256": "", "padding_exact": True, "padding_audit": {}, "created_at": "now",
            "versions": "{}"}
    writer = StoreWriter.create(path, rows, {**base, **(attrs or {})}, [dim] * num_layers,
                                extra_columns=list(extra or {}))
    writer.write_items([(i, {}, frames[i]) for i in range(len(rows))])
    return writer.finalize()


def set_column(path: Path, name: str, values) -> None:
    """Overwrite one ``items/`` column (strings, or numbers for a numeric column)."""
    with h5py.File(path, "a") as f:
        old = f["items"][name]
        numeric = old.dtype.kind in "iuf"
        dtype = old.dtype
        del f["items"][name]
        if numeric:
            f["items"].create_dataset(name, data=np.asarray(values, dtype=dtype))
        else:
            f["items"].create_dataset(name, data=np.array([str(v) for v in values], dtype=object),
                                      dtype=h5py.string_dtype())


def column(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.array([v.decode() if isinstance(v, bytes) else v for v in f["items"][name][:]], dtype=object)


def statuses(report) -> dict[str, str]:
    return {s.name: s.status for s in report}


def assert_fails_at(report, step: str) -> None:
    """``step`` fails; no earlier step fails; a later failure names its cause."""
    st = statuses(report)
    assert st[step] == FAIL, (step, st, report.step(step).message)
    order = list(STEPS)
    for name in order[: order.index(step)]:
        assert st[name] != FAIL, (name, report.step(name).message)
    assert report.exit_code == 1


# ---------------------------------------------------------------------------------------------
# Healthy
# ---------------------------------------------------------------------------------------------
def test_healthy_store_passes_every_step(tmp_path):
    report = run_doctor(healthy(tmp_path / "h.h5"), out_dir=tmp_path / "out", **FAST)
    assert [s.name for s in report] == list(STEPS)
    assert statuses(report) == {name: PASS for name in STEPS}, [(s.name, s.message) for s in report if s.status != PASS]
    assert report.exit_code == 0
    assert report.best["layer"] == 2  # the informative layer
    assert report.best["balanced_accuracy"] > 0.8
    ev = report.step("label-shuffle control").evidence
    assert ev["p_value"] == pytest.approx(1 / 21, abs=1e-3)
    assert ev["shuffled_mean"] < 0.45
    ev = report.step("features and alignment").evidence
    assert ev["items_nonfinite"] == 0 and ev["shift_gain"] < 0  # labels as given fit best
    # report files
    md = (tmp_path / "out" / "doctor.md").read_text()
    assert "![layer_profile](layer_profile.png)" in md and "| 5 | label-shuffle control | **pass** |" in md
    assert (tmp_path / "out" / "layer_profile.png").stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "doctor.json").read_text())
    assert [s["status"] for s in data["steps"]] == [PASS] * 8 and data["exit_code"] == 0


# ---------------------------------------------------------------------------------------------
# Broken stores
# ---------------------------------------------------------------------------------------------
def test_shuffled_labels_fail_the_shuffle_control(tmp_path):
    path = healthy(tmp_path / "s.h5")
    labels, groups = column(path, "label"), column(path, "group")
    spk = sorted(set(groups))
    lab = {g: labels[groups == g][0] for g in spk}
    perm = np.random.default_rng(3).permutation(spk)
    set_column(path, "label", [lab[perm[spk.index(g)]] for g in groups])  # labels moved to other speakers
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "label-shuffle control")
    ev = report.step("label-shuffle control").evidence
    assert ev["shuffle"] == 1 and "speaker-level shuffle" in report.step("label-shuffle control").message
    assert ev["p_value"] > 0.05
    assert "no better than shuffled labels" in report.step("label-shuffle control").message
    for name in ("layer profile", "class imbalance"):
        s = report.step(name)
        assert s.status == PASS or s.caused_by == "label-shuffle control", (name, s)


def test_duration_confound_fails_confounds(tmp_path):
    def item(rng, s, y, j):  # label sets the length; frames are noise + a speaker offset
        t = int(rng.integers(*[(4, 7), (10, 14), (20, 26)][y]))
        off = np.random.default_rng(100 + s).normal(size=(3, 1, 16))
        return rng.normal(size=(3, t, 16)) + off, 320 * t + 80

    report = run_doctor(build_store(tmp_path / "d.h5", item=item), out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "confounds")
    ev = report.step("confounds").evidence
    assert ev["duration_balanced_accuracy"] > 0.9
    assert ev["duration_p_value"] < 0.05
    assert abs(ev["loudness_balanced_accuracy"] - 1 / 3) < 0.2
    assert "duration" in report.step("confounds").advice


def test_group_column_equal_to_item_id_fails_fold_sanity(tmp_path):
    # each speaker's items share a strong speaker offset, labels are constant per speaker, the
    # label cue is weak: folds by item id let the probe recognise speakers
    path = healthy(tmp_path / "g.h5", cue_strength=0.5, speaker_strength=2.0)
    set_column(path, "group", column(path, "id"))
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "fold sanity")
    ev = report.step("fold sanity").evidence
    assert ev["group_equals_id"] == 1.0 and ev["items_in_single_item_groups"] == 1.0
    assert ev["nearest_neighbour_ratio"] < 0.7 * ev["nearest_neighbour_ratio_unclustered"]
    assert ev["score_given_groups"] - ev["score_cluster_groups"] >= 0.10
    assert "leak speakers" in report.step("fold sanity").message
    assert "--group-column" in report.step("fold sanity").advice


def test_store_without_groups_warns_and_measures_the_leak(tmp_path):
    path = healthy(tmp_path / "n.h5")  # strong label cue: holding out speakers costs little
    set_column(path, "group", [""] * 180)
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    s = report.step("fold sanity")
    assert s.status == WARN and s.message.startswith("the store has no speaker groups; the items form tight clusters")
    assert s.evidence["cluster_groups"] >= 20
    assert 0 <= s.evidence["score_given_groups"] - s.evidence["score_cluster_groups"] < 0.10
    assert report.step("label-shuffle control").message.count("item-level shuffle") == 1


def test_constant_features_fail_features_and_alignment(tmp_path):
    def item(rng, s, y, j):
        t = int(rng.integers(4, 12))
        return np.ones((3, t, 16)), 320 * t + 80

    report = run_doctor(build_store(tmp_path / "c.h5", item=item), out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "features and alignment")
    s = report.step("features and alignment")
    assert "constant across items in layer(s) 0,1,2" in s.message
    assert s.evidence["constant_dims_share"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    later = [report.step(n) for n in STEPS[STEPS.index("features and alignment") + 1:]]
    assert all(x.caused_by == "features and alignment" for x in later if x.status == FAIL)
    assert report.step("label-shuffle control").status == FAIL


def test_padding_dominated_frames_fail_padding_step(tmp_path):
    pad = np.random.default_rng(9).normal(size=16)
    cue = np.random.default_rng(8).normal(size=(3, 16))

    def item(rng, s, y, j):  # true frames (with a label cue) + frames of padding up to 49 frames
        t = int(rng.integers(4, 12))
        x = rng.normal(size=(3, 49, 16)) * 0.5 + np.random.default_rng(100 + s).normal(size=(3, 1, 16))
        x[:, t // 2] += 2.0 * cue[y]
        x[:, t:] = pad + 0.01 * rng.normal(size=(49 - t, 16))
        return x, 320 * t + 80

    report = run_doctor(build_store(tmp_path / "p.h5", item=item), out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "padding and pooling")
    ev = report.step("padding and pooling").evidence
    assert ev["items_with_unexplained_frames"] == 1.0
    assert ev["padding_frame_share"] > 0.7
    assert ev["edge_frame_spread_ratio"] < 0.25
    assert "re-extract padding-exact" in report.step("padding and pooling").advice


def test_stale_pooled_cache_fails_padding_step(tmp_path):
    path = healthy(tmp_path / "h.h5")
    from featstore.store import open_store
    from probes.pooling import pooled_matrix

    with open_store(path) as st:
        good = pooled_matrix(st, 1, "mean", cache=False)
        nfr = st.column("num_frames")
    write_pooled(path, "clip-mean", 1, good * (nfr / 49.0)[:, None])  # a padded pipeline's means
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    s = report.step("padding and pooling")
    assert s.status == FAIL and s.evidence["pooled_cache_mismatch"] == 1
    assert "pooled/clip-mean/01" in s.message
    assert report.step("label-shuffle control").status == PASS  # doctor pools from the frames


def test_duplicated_audio_across_folds_fails_fold_sanity(tmp_path):
    path = healthy(tmp_path / "h.h5")
    sha, groups = column(path, "sha256"), column(path, "group")
    first = np.flatnonzero(groups == groups[0])[0]
    other = np.flatnonzero(groups != groups[0])[::7]  # another speaker's items reuse speaker 0's clip
    sha[other] = sha[first]
    set_column(path, "sha256", sha)
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    assert report.step("data sanity").status == FAIL  # identical audio under different labels
    assert report.step("data sanity").evidence["duplicated_audio_conflicting_labels"] == 1
    s = report.step("fold sanity")
    assert s.status == FAIL and s.evidence["identical_audio_across_folds"] >= 1
    assert s.caused_by == "data sanity"


def test_single_class_skips_the_rest(tmp_path):
    path = healthy(tmp_path / "h.h5")
    set_column(path, "label", ["Normal"] * len(column(path, "label")))
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    assert report.step("data sanity").status == FAIL
    assert "only one class ('Normal')" in report.step("data sanity").message
    assert all(s.status == SKIP and s.caused_by == "data sanity" for s in report[1:])


def test_baseline_comparison(tmp_path):
    model = healthy(tmp_path / "m.h5")
    base = healthy(tmp_path / "b.h5", num_layers=1, informative_layers=(), seed=0)  # same ids, no cue
    report = run_doctor(model, baseline=base, out_dir=tmp_path / "out", **FAST)
    s = report.step("layer profile")
    assert s.status == PASS, s.message
    assert "the model beats fake by" in s.message
    assert s.evidence["model_minus_baseline"] > 0.3 and s.evidence["difference_ci_low"] > 0
    # reversed: the baseline is the better store
    report = run_doctor(base, baseline=model, out_dir=tmp_path / "out2", **FAST)
    s = report.step("layer profile")
    assert s.status == WARN and "does not beat fake" in s.message


def _lda_reference(X, y, tr, te, k, shrink=0.2):
    """The screen probe written plainly for one fold and one label vector."""
    mu = X[tr].mean(axis=0)
    Xc, Xt = X[tr] - mu, X[te] - mu
    S = Xc.T @ Xc / len(tr)
    S = (1 - shrink) * S + (shrink * np.trace(S) / X.shape[1] + 1e-9) * np.eye(X.shape[1])
    scores = []
    for c in range(k):
        m = Xc[y[tr] == c].mean(axis=0)
        w = np.linalg.solve(S, m)
        scores.append(Xt @ w - 0.5 * m @ w)
    return np.argmax(np.stack(scores, axis=1), axis=1)


def test_screen_probe_batches_permutations_exactly():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    y = np.repeat([0, 1, 2], 20)
    X[y == 1, 0] += 5
    X[y == 2, 1] += 5
    folds = [(np.arange(0, 60, 2), np.arange(1, 60, 2)), (np.arange(1, 60, 2), np.arange(0, 60, 2))]
    Y = np.stack([y, rng.permutation(y), rng.permutation(y)])
    pred = lda_cv_predict(X, Y, folds, 3)
    assert pred.shape == (3, 60)
    assert np.mean(pred[0] == y) > 0.9
    for p in range(3):
        for tr, te in folds:
            assert np.array_equal(pred[p, te], _lda_reference(X, Y[p], tr, te, 3))
    # a class absent from training is never predicted
    only01 = [(np.flatnonzero(y < 2), np.flatnonzero(y == 2))]
    assert set(lda_cv_predict(X, y[None], only01, 3)[0][y == 2]) <= {0, 1}


def test_user_errors(tmp_path):
    with pytest.raises(DoctorError, match="no store at"):
        run_doctor(tmp_path / "missing.h5", **FAST)
    path = healthy(tmp_path / "h.h5")
    with pytest.raises(DoctorError, match=r"layer 7 does not exist: the store has layers 0\.\.3"):
        run_doctor(path, layers=[7], out_dir=tmp_path / "o", **FAST)
    with pytest.raises(DoctorError, match="cv must be at least 2, got 1"):
        run_doctor(path, out_dir=tmp_path / "o", n_permutations=5, cv=1, progress=False)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _app():
    from featstore_cli.doctor_cmd import doctor

    app = typer.Typer()
    app.command("doctor")(doctor)
    return app


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    app = _app()
    good = healthy(tmp_path / "good.h5")
    args = ["--cv", "3", "--n-permutations", "20", "--no-progress"]
    res = runner.invoke(app, [str(good), "--out", str(tmp_path / "o1"), *args])
    assert res.exit_code == 0, res.output
    assert "label-shuffle control" in res.output and "PASS" in res.output
    assert (tmp_path / "o1" / "doctor.md").exists()

    bad = healthy(tmp_path / "bad.h5")
    set_column(bad, "label", ["Normal"] * len(column(bad, "label")))
    res = runner.invoke(app, [str(bad), "--out", str(tmp_path / "o2"), *args])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output

    res = runner.invoke(app, [str(tmp_path / "nope.h5"), *args])
    assert res.exit_code == 2
    assert "no store at" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [str(good), "--layers", "x-y", *args])
    assert res.exit_code == 2 and "bad layer spec" in res.output
    res = runner.invoke(app, [str(good), "--cv", "1", "--n-permutations", "5"])
    assert res.exit_code == 2 and "cv must be at least 2" in res.output


# ---------------------------------------------------------------------------------------------
# More single defects
# ---------------------------------------------------------------------------------------------
def test_nan_frames_fail_features_and_alignment(tmp_path):
    def item(rng, s, y, j):
        t = int(rng.integers(4, 12))
        x = rng.normal(size=(3, t, 16)) + np.eye(16)[y] * 2
        if j == 0:
            x[1, 0, 3] = np.nan  # one item per speaker carries a NaN frame in layer 1
        return x, 320 * t + 80

    report = run_doctor(build_store(tmp_path / "n.h5", item=item), out_dir=tmp_path / "out", **FAST)
    assert_fails_at(report, "features and alignment")
    s = report.step("features and alignment")
    assert s.evidence["items_nonfinite"] == 30 and s.evidence["nonfinite_items_per_layer"] == {"1": 30}
    assert "30 items have NaN/inf features (layers 1)" in s.message
    # the other 150 items still carry the label
    assert report.step("label-shuffle control").evidence["logreg_balanced_accuracy"] > 0.9


def test_padding_audit_of_a_non_exact_store_warns(tmp_path):
    path = healthy(tmp_path / "a.h5")
    with h5py.File(path, "a") as f:
        f.attrs["padding_exact"] = False
        f.attrs["padding_audit"] = json.dumps({"clips": 8, "pad_seconds": 1.0, "max_abs": [0.1, 2.5, 1.0, 0.4],
                                               "mean_abs": [0.01, 0.3, 0.2, 0.05]})
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    s = report.step("padding and pooling")
    assert s.status == WARN
    assert s.message.startswith("this store is not padding-exact (recipe not recorded)")
    assert "moves frames by up to 2.50 (layer 1; 8 clips padded to 1.0 s" in s.message
    assert s.evidence["audit_max_abs"] == 2.5 and s.evidence["audit_mean_abs"] == 0.3


def test_collapse_on_a_store_without_signal(tmp_path):
    # no label cue, 80 % of the speakers in one class: logistic regression predicts that class
    # (seed 3: with seed 0 the 5 speakers of a small class happen to share a direction)
    path = healthy(tmp_path / "c.h5", cue_strength=0.0, class_probs=(0.8, 0.1, 0.1), n_speakers=40, seed=3)
    report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    assert report.step("label-shuffle control").status == FAIL
    s = report.step("padding and pooling")
    assert s.status == FAIL and "true pooling collapses" in s.message
    assert s.evidence["largest_predicted_share"]["true"] > 0.9
    assert s.caused_by == "label-shuffle control"
    assert report.step("layer profile").status == WARN
    assert report.step("layer profile").caused_by == "label-shuffle control"


# ---------------------------------------------------------------------------------------------
# The store is only read; the prepared view cannot be changed by a step
# ---------------------------------------------------------------------------------------------
def test_doctor_reads_a_read_only_store_and_never_writes_it(tmp_path):
    import os
    import stat


    path = healthy(tmp_path / "ro" / "h.h5")
    write_pooled(path, "clip-mean", 1, np.zeros((180, 16), dtype=np.float32))  # a stale cache to check
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(path, stat.S_IRUSR)
    os.chmod(path.parent, stat.S_IRUSR | stat.S_IXUSR)
    try:
        report = run_doctor(path, out_dir=tmp_path / "out", **FAST)
    finally:
        os.chmod(path.parent, stat.S_IRWXU)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["h.h5"]
    s = report.step("padding and pooling")
    assert s.status == FAIL and s.evidence["pooled_cache_mismatch"] == 1
    assert report.step("label-shuffle control").status == PASS  # pooled from the frames, not the cache


def test_the_view_is_frozen(tmp_path):
    import dataclasses

    from featstore.store import open_store
    from probes.doctor.view import prepare_view, read_table

    with open_store(healthy(tmp_path / "h.h5")) as store:
        view = prepare_view(store, read_table(store, None, 3, 0), n_perm=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.y = view.y[::-1]
    with pytest.raises(ValueError, match="read-only"):
        view.y[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        view.X(2, "stats")[0, 0] = 0.0
    with pytest.raises(TypeError):
        view.pooled[(2, "stats")] = None
    with pytest.raises(ValueError, match="read-only"):
        view.screen.best_pred[0] = 0
    assert view.screen.best[0] == 2 and len(view.folds) == 3 and view.rows.tolist() == list(range(180))


def test_paired_speaker_bootstrap_of_a_difference():
    from probes.bootstrap import paired_difference_ci as paired_bootstrap_diff
    from probes.metrics import balanced_accuracy

    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{i}" for i in range(12)], 5).astype(object)
    groups[:5] = ""  # five items without a speaker: each its own group
    y = rng.integers(0, 3, size=60)
    a = np.where(rng.random(60) < 0.8, y, (y + 1) % 3)
    b = np.where(rng.random(60) < 0.5, y, (y + 2) % 3)
    lo, hi = paired_bootstrap_diff(y, a, b, groups, 3, n_boot=200, seed=1)
    # the same resamples written out: draw speakers with replacement, keep all their items
    names = np.array(sorted(set(f"__item_{i}" if g == "" else g for i, g in enumerate(groups))))
    filled = np.array([f"__item_{i}" if g == "" else g for i, g in enumerate(groups)])
    w = np.random.default_rng(1).multinomial(len(names), np.full(len(names), 1 / len(names)), size=200)
    diffs = []
    for counts in w:
        idx = np.concatenate([np.repeat(np.flatnonzero(filled == n), c) for n, c in zip(names, counts)])
        diffs.append(balanced_accuracy(y[idx], a[idx], 3) - balanced_accuracy(y[idx], b[idx], 3))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert 0 < lo < hi
    assert paired_bootstrap_diff(y, a, a, groups, 3, n_boot=50) == (0.0, 0.0)


def write_pooled(path, key: str, k: int, values) -> None:
    """A legacy in-file ``pooled/<key>/NN`` group, as stores written before the sidecar cache
    hold it (the library itself never writes into a finished store)."""
    import h5py

    with h5py.File(path, "a") as h5:
        h5.create_dataset(f"pooled/{key}/{k:02d}", data=np.asarray(values, dtype=np.float32))

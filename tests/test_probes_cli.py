"""The `probes` command line, in-process (typer's CliRunner): sweep, report, fit, predict, errors."""
from __future__ import annotations

import io
import shutil

import h5py
import pandas as pd
import pytest
from typer.testing import CliRunner

from featstore_cli.probes_app import app
from featstore.fakestore import write_fake_store

runner = CliRunner()
TINY = dict(n_speakers=18, items_per_speaker=5, num_layers=3, dim=8, informative_layers=(1,), cue_strength=2.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_fake_store(tmp_path_factory.mktemp("cli") / "fake.h5", seed=0, **TINY)


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_sweep_then_report(store, tmp_path):
    out = tmp_path / "sweep"
    res = _ok(runner.invoke(app, ["sweep", str(store), "--layers", "0-1", "--pooling", "mean,max", "--probe", "logreg",
                                  "--class-weight", "none", "--cv", "3", "--n-jobs", "1", "--out", str(out),
                                  "--no-progress", "--no-report", "--n-boot", "100"]))
    assert "Best configurations" in res.output and "headline balanced accuracy" in res.output and "true nested CV" in res.output
    folds = pd.read_csv(out / "folds.csv", dtype={"layer": str})
    summary = pd.read_csv(out / "summary.csv", dtype={"layer": str})
    assert {"store", "encoder", "layer", "scope", "pooling", "probe", "class_weight", "fold", "accuracy",
            "balanced_accuracy", "macro_f1", "roc_auc_ovr", "fit_seconds", "majority_bacc", "chance_bacc"} <= set(folds.columns)
    assert {"balanced_accuracy_mean", "balanced_accuracy_std", "bacc_ci_low", "bacc_ci_high",
            "majority_bacc", "chance_bacc"} <= set(summary.columns)
    assert sorted(summary["probe"].unique()) == ["chance", "logreg", "majority"]
    assert sorted(summary.loc[summary["probe"] == "logreg", "layer"].unique()) == ["0", "1"]
    assert (out / "predictions.csv").exists() and (out / "best.json").exists()

    rep = _ok(runner.invoke(app, ["report", str(out)]))
    assert "report.md" in rep.output
    for name in ("layers.png", "heatmap.png", "confusion_best.png"):
        assert (out / name).stat().st_size > 1000, name
    text = (out / "report.md").read_text()
    assert "Nested-CV balanced accuracy" in text and "selection on other outer folds — not nested" in text and "majority" in text and "![" in text


def test_sweep_writes_report_by_default(store, tmp_path):
    out = tmp_path / "s"
    _ok(runner.invoke(app, ["sweep", str(store), "--layers", "1", "--pooling", "max", "--probe", "logreg",
                            "--class-weight", "balanced", "--cv", "3", "--n-jobs", "1", "--out", str(out),
                            "--no-progress", "--label-map", "Lateral:Disordered,Interdental:Disordered"]))
    assert (out / "report.md").exists() and (out / "layers.png").exists()
    assert "sensitivity" in (out / "report.md").read_text()


def test_fit_predict_round_trip(store, tmp_path):
    model = tmp_path / "m.joblib"
    res = _ok(runner.invoke(app, ["fit", str(store), "--layer", "1", "--pooling", "max", "--probe", "logreg",
                                  "--out", str(model), "--cv-score", "0.9"]))
    assert "saved" in res.output
    from probes.model_io import load_bundle

    bundle = load_bundle(model)
    assert bundle["layer"] == 1 and bundle["pooling"] == "max" and bundle["encoder"] == "fake"
    assert bundle["classes"] == ["Interdental", "Lateral", "Normal"] and bundle["feature_dim"] == 8
    assert bundle["cv_score"] == 0.9 and bundle["n_train"] == 90

    pred = _ok(runner.invoke(app, ["predict", str(model), str(store)]))
    df = pd.read_csv(io.StringIO(pred.stdout))
    assert list(df.columns) == ["id", "status", "pred", "proba_Interdental", "proba_Lateral", "proba_Normal"]
    assert len(df) == 90
    with h5py.File(store, "r") as h5:
        truth = [v.decode() for v in h5["items/label"][:]]
    assert (df["pred"] == truth).mean() > 0.9  # training items

    out_csv = tmp_path / "p.csv"
    _ok(runner.invoke(app, ["predict", str(model), str(store), "--out", str(out_csv)]))
    assert pd.read_csv(out_csv).equals(df)


def test_predict_refuses_another_encoder(store, tmp_path):
    model = tmp_path / "m.joblib"
    _ok(runner.invoke(app, ["fit", str(store), "--layer", "1", "--out", str(model)]))
    other = tmp_path / "other.h5"
    shutil.copy(store, other)
    with h5py.File(other, "r+") as h5:
        h5.attrs["encoder"] = "logmel"
    res = runner.invoke(app, ["predict", str(model), str(other)])
    assert res.exit_code == 2
    assert "trained on features of encoder 'fake'" in res.output and "holds 'logmel'" in res.output
    assert "Traceback" not in res.output
    wide = write_fake_store(tmp_path / "wide.h5", seed=0, **{**TINY, "dim": 12})
    res = runner.invoke(app, ["predict", str(model), str(wide)])
    assert res.exit_code == 2 and "the model expects 8" in res.output
    reseeded = write_fake_store(tmp_path / "reseeded.h5", seed=1, **TINY)  # encoder_config {"seed": 1}
    res = runner.invoke(app, ["predict", str(model), str(reseeded)])
    assert res.exit_code == 2 and "different encoder configuration" in res.output


def test_self_pooling_bundles_round_trip(store, tmp_path):
    from probes.model_io import fit_final, load_bundle, predict_store

    b = fit_final(store, "all", probe="weighted-layers", out=tmp_path / "w.joblib", params={"epochs": 2, "hidden": 0})
    assert b["layer"] == "all" and b["layers_used"] == [0, 1, 2] and b["pooling"] == "mean"
    df = predict_store(load_bundle(tmp_path / "w.joblib"), store)
    assert len(df) == 90 and df["pred"].isin(b["classes"]).all()
    a = fit_final(store, 1, probe="attn-mlp", params={"epochs": 2, "hidden": 8})
    assert a["pooling"] == "attention"
    p = predict_store(a, store)
    assert abs(p.filter(like="proba_").sum(axis=1) - 1).max() < 1e-6


def test_predict_from_a_manifest_extracts_first(store, tmp_path, monkeypatch):
    import featstore.extract as fx

    model = tmp_path / "m.joblib"
    _ok(runner.invoke(app, ["fit", str(store), "--layer", "1", "--out", str(model)]))
    manifest = tmp_path / "clips.csv"
    manifest.write_text("path,label\na.wav,x\n")
    calls = []

    def fake_extract(path, encoder_name, *args, **kwargs):
        calls.append((path, encoder_name))
        return store

    monkeypatch.setattr(fx, "extract_for_predict", fake_extract, raising=False)
    res = _ok(runner.invoke(app, ["predict", str(model), str(manifest)]))
    assert calls == [(manifest, "fake")] and "proba_Lateral" in res.stdout
    monkeypatch.delattr(fx, "extract_for_predict")
    res = runner.invoke(app, ["predict", str(model), str(manifest)])
    assert res.exit_code == 2 and "extract_for_predict" in res.output


@pytest.mark.parametrize("args, message", [
    (["sweep", "missing.h5"], "no store at missing.h5"),
    (["sweep", "{store}", "--layers", "0-x"], "bad layer spec '0-x'"),
    (["sweep", "{store}", "--layers", "9"], "has none of the layers 9"),
    (["sweep", "{store}", "--pooling", "median"], "unknown pooling 'median'"),
    (["sweep", "{store}", "--probe", "svm"], "unknown probe 'svm'"),
    (["sweep", "{store}", "--cv", "1"], "cv must be at least 2"),
    (["report", "nowhere"], "no sweep directory at nowhere"),
    (["fit", "{store}", "--layer", "7", "--out", "m.joblib"], "has no layer 7 (it has 0,1,2)"),
    (["fit", "{store}", "--layer", "1", "--probe", "svm", "--out", "m.joblib"], "unknown probe 'svm'"),
    (["predict", "nomodel.joblib", "{store}"], "no model at nomodel.joblib"),
    (["predict", "{store}", "{store}"], "is not a saved probe model"),
])
def test_user_errors_are_one_red_line(store, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{store}", str(store)) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (ValueError, KeyError, OSError))

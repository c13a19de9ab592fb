"""Layer-wise analysis on stores with known structure, and the `probes analyze` command."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from featstore_cli.analyze_cmd import analyze
from featstore.fakestore import write_fake_store
from featstore.store import StoreWriter
from probes.analysis import AnalysisError, find_crossover, layer_profile, layer_similarity

N_SPK, PER_SPK = 40, 6
ATTRS = {"encoder": "synthetic", "encoder_revision": "", "encoder_config": {}, "sample_rate": 16000,
         "frame_stride_samples": 320, "receptive_field_samples": 400, "first_frame_center_samples": 200.0,
         "manifest_sha256": "", "padding_exact": True, "padding_audit": {}, "created_at": "", "versions": "{}"}


def write_structured_store(path: Path, ids_prefix: str = "", seed: int = 0) -> Path:
    """4 layers x 8 dims: 0 noise, 1 speaker only, 2 label only, 3 label + speaker.

    Labels are constant within speakers; 2 items failed and 2 have no label.
    """
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b", "c"])[np.arange(N_SPK) % 3]
    spk_dir, cls_dir = rng.normal(size=(N_SPK, 8)) * 1.5, rng.normal(size=(3, 8)) * 1.5
    rows, frames = [], []
    for s in range(N_SPK):
        for j in range(PER_SPK):
            y = int(np.flatnonzero(np.array(["a", "b", "c"]) == labels[s])[0])
            t = int(rng.integers(3, 7))
            noise = rng.normal(size=(4, t, 8))
            layers = [noise[0], noise[1] + spk_dir[s], noise[2] + cls_dir[y], noise[3] + cls_dir[y] + spk_dir[s]]
            rows.append({"id": f"{ids_prefix}s{s:02d}_{j}", "path": "x.wav", "label": labels[s], "group": f"s{s:02d}",
                         "num_samples": 320 * t + 80, "sex": "FM"[rng.integers(0, 2)] if j == 0 else None})
            frames.append(layers)
    for r in rows:  # one sex per speaker
        r["sex"] = rows[[x["group"] for x in rows].index(r["group"])]["sex"]
    rows[0]["label"] = rows[7]["label"] = ""
    w = StoreWriter.create(path, rows, ATTRS, [8] * 4, extra_columns=["sex"])
    failed = {3, 100}
    w.write_items([(i, {"status": "decode_error", "error": "bad file"} if i in failed else {},
                    None if i in failed else frames[i]) for i in range(len(rows))])
    return w.finalize()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_structured_store(tmp_path_factory.mktemp("an") / "structured.h5")


@pytest.fixture(scope="module")
def profile(store) -> pd.DataFrame:
    notes = []
    df = layer_profile(store, nuisances=("group", "sex"), n_boot=30, n_shuffle=6, seed=0, log=notes.append)
    df.attrs["log"] = notes
    return df


def _score(df: pd.DataFrame, method: str, target: str, layer: int, shuffled: bool = False) -> float:
    row = df[(df.method == method) & (df.target == target) & (df.layer == layer) & (df.shuffled == shuffled)]
    assert len(row) == 1
    return float(row.score.iloc[0])


def test_profile_table_shape_and_skips(profile):
    assert list(profile.columns[:8]) == ["store", "layer", "method", "target", "score", "ci_low", "ci_high", "shuffled"]
    # 4 layers x 3 methods x 3 targets x (real + shuffled)
    assert len(profile) == 4 * 3 * 3 * 2
    assert set(profile.target) == {"label", "group", "sex"}
    assert (profile.n_items == N_SPK * PER_SPK - 4).all() and (profile.n_speakers == N_SPK).all()
    assert profile.attrs["log"][0] == "structured.h5: using 236 of 240 items (2 not ok, 2 with empty label)"
    assert (profile.scope == "clip").all() and (profile.dims == 8).all()


@pytest.mark.parametrize("method", ["svcca", "pwcca", "cka"])
def test_methods_rank_label_speaker_and_noise_layers(profile, method):
    label = [_score(profile, method, "label", k) for k in range(4)]
    group = [_score(profile, method, "group", k) for k in range(4)]
    # the label layer beats the noise and the speaker-only layer for the label ...
    assert label[2] > label[0] + 0.4 and label[2] > label[1] + 0.3
    # ... and the speaker-only layer beats the noise and the label-only layer for the speaker
    margin = 0.15 if method == "cka" else 0.3  # (the label-only layer tells speakers of 3 classes apart)
    assert group[1] > group[0] + 0.25 and group[1] > group[2] + margin
    if method != "cka":  # held-out CCA: unrelated layers score ~0
        assert label[2] > 0.8 and group[1] > 0.75
        assert abs(label[0]) < 0.3 and abs(label[1]) < 0.35 and abs(group[0]) < 0.2


@pytest.mark.parametrize("method", ["svcca", "pwcca"])
def test_shuffled_control_is_near_zero(profile, method):
    sh = profile[profile.shuffled & (profile.method == method) & (profile.target.isin(["label", "group"]))]
    assert len(sh) == 8
    assert sh.score.abs().max() < 0.2
    real = profile[~profile.shuffled & (profile.method == method) & (profile.target == "label") & (profile.layer == 2)]
    assert float(real.score.iloc[0]) > sh.ci_high.max() + 0.4


def test_cka_floor_and_intervals(profile):
    sh = profile[profile.shuffled & (profile.method == "cka")]
    assert sh.score.max() < 0.2  # biased CKA has a small positive floor
    real = profile[~profile.shuffled]
    assert (real.ci_low <= real.score + 1e-12).all() and (real.score <= real.ci_high + 1e-12).all()
    width = real.ci_high - real.ci_low
    assert (width > 0).all() and width.median() < 0.6


def test_layer_similarity_self_and_across_stores(store, tmp_path):
    m = layer_similarity(store)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert m[2, 3] > m[0, 2] + 0.2  # layers 2 and 3 share the label directions
    sv = layer_similarity(store, method="svcca")
    np.testing.assert_allclose(np.diag(sv), 1.0, atol=1e-9)
    assert sv[0, 1] < 0.2
    other = write_structured_store(tmp_path / "other.h5", seed=1)  # same ids, different features
    cross = layer_similarity(store, other, layers_b=[0, 2])
    assert cross.shape == (4, 2)
    with pytest.raises(AnalysisError, match="frame-level similarity needs the same frames per item in both stores"):
        layer_similarity(store, other, level="frames")  # other frame counts
    frames = layer_similarity(store, level="frames", max_rows=300)
    np.testing.assert_allclose(np.diag(frames), 1.0, atol=1e-9)
    disjoint = write_structured_store(tmp_path / "disjoint.h5", ids_prefix="x")
    with pytest.raises(AnalysisError, match="have no items in common"):
        layer_similarity(store, disjoint)


def test_center_and_frame_levels(tmp_path):
    path = write_fake_store(tmp_path / "seg.h5", n_speakers=24, items_per_speaker=5, num_layers=3, dim=8,
                            informative_layers=(1,), cue_strength=3.0, with_segments=True, seed=2)
    for level in ("center", "frames"):
        df = layer_profile(path, nuisances=(), methods=("svcca",), level=level, n_boot=0, n_shuffle=0,
                           max_rows=200)  # 289 segment frames: 200 drawn
        label = df[df.target == "label"].set_index("layer").score
        assert label[1] > label[0] + 0.4 and label[1] > label[2] + 0.4
        assert (df.scope == "segment").all() and df.ci_low.isna().all()
        assert (df.n_rows == (120 if level == "center" else 200)).all()


def test_crossover_detection():
    rows = []
    for k, (t, s) in enumerate([(0.1, 0.9), (0.2, 0.8), (0.6, 0.4), (0.7, 0.3)]):
        rows += [dict(store="m", layer=k, method="svcca", target="label", score=t, shuffled=False),
                 dict(store="m", layer=k, method="svcca", target="group", score=s, shuffled=False)]
    df = pd.DataFrame(rows)
    assert find_crossover(df, "m", "svcca") == 2
    df.loc[df.target == "group", "score"] = 0.1  # speaker never above the label: no crossover
    assert find_crossover(df, "m", "svcca") is None


def test_bad_options(store):
    with pytest.raises(AnalysisError, match="has no items/ column 'age'; usable columns: label, group, sex"):
        layer_profile(store, nuisances=("age",), n_boot=0, n_shuffle=0)
    with pytest.raises(AnalysisError, match="unknown method foo"):
        layer_profile(store, methods=("foo",))
    with pytest.raises(AnalysisError, match=r"layer 9 does not exist: structured.h5 has layers 0..3"):
        layer_profile(store, layers=[9], n_boot=0, n_shuffle=0)
    with pytest.raises(AnalysisError, match="no store at"):
        layer_profile(store.parent / "missing.h5")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("analyze")(analyze)

    @app.callback()
    def main() -> None:  # keeps `analyze` a subcommand
        pass

    return app


def test_cli_writes_table_plots_and_report(store, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), ["analyze", str(store), "--nuisance", "group,sex", "--n-boot", "10",
                                      "--n-shuffle", "2", "--layers", "0-3", "--n-jobs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["analysis.md", "profile.csv", "profile_structured.png", "report.html",
                     "similarity_structured_structured.csv",
                     "similarity_structured_structured_cka.png", "similarity_structured_structured_pwcca.png",
                     "similarity_structured_structured_svcca.png"]
    table = pd.read_csv(out / "profile.csv")
    assert len(table) == 72 and set(table.method) == {"svcca", "pwcca", "cka"}
    sim = pd.read_csv(out / "similarity_structured_structured.csv")
    assert list(sim.columns) == ["method", "layer_a", "layer_b", "score"] and len(sim) == 3 * 16
    report = (out / "analysis.md").read_text()
    assert "using 236 of 240 items (2 not ok, 2 with empty label)" in report
    assert "| svcca | label | 2 |" in report
    assert (out / "profile_structured.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--nuisance", "age"], "has no items/ column 'age'"),
    (["--method", "svcca,foo"], "--method: unknown 'foo'"),
    (["--layers", "0-x"], "--layers: bad layer spec '0-x'"),
    (["--level", "word"], "unknown level 'word'"),
])
def test_cli_user_errors_are_one_red_line(store, tmp_path, args, message):
    res = CliRunner().invoke(_app(), ["analyze", str(store), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert text.startswith("error:") and message in text
    assert "Traceback" not in res.output


def test_cli_missing_store(tmp_path):
    res = CliRunner().invoke(_app(), ["analyze", str(tmp_path / "nope.h5")])
    assert res.exit_code == 2 and "no store at" in res.output


def write_subset_store(path: Path, seed: int = 3) -> Path:
    """A store extracted with ``--layers 0,4,8``: stored layers 0 (noise), 4 (speaker), 8 (label)."""
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b", "c"])[np.arange(24) % 3]
    spk_dir, cls_dir = rng.normal(size=(24, 6)) * 1.5, rng.normal(size=(3, 6)) * 1.5
    rows, frames = [], []
    for s in range(24):
        for j in range(5):
            t = int(rng.integers(3, 7))
            noise = rng.normal(size=(3, t, 6))
            y = "abc".index(labels[s])
            frames.append([noise[0], noise[1] + spk_dir[s], noise[2] + cls_dir[y]])
            rows.append({"id": f"s{s:02d}_{j}", "path": "x.wav", "label": labels[s], "group": f"s{s:02d}",
                         "num_samples": 320 * t + 80})
    w = StoreWriter.create(path, rows, {**ATTRS, "layer_ids": [0, 4, 8]}, [6] * 3, layer_ids=[0, 4, 8])
    w.write_items([(i, {}, f) for i, f in enumerate(frames)])
    return w.finalize()


def test_layer_subset_store(tmp_path):
    """Stored layer ids 0, 4, 8 (not 0..2): profile, similarity and the command use them."""
    path = write_subset_store(tmp_path / "subset.h5")
    df = layer_profile(path, nuisances=("group",), n_boot=5, n_shuffle=2)
    assert sorted(set(df.layer)) == [0, 4, 8]
    assert _score(df, "svcca", "label", 8) > _score(df, "svcca", "label", 0) + 0.4
    assert _score(df, "svcca", "group", 4) > _score(df, "svcca", "group", 0) + 0.3
    last = layer_profile(path, nuisances=(), methods=("cka",), layers="-1", n_boot=0, n_shuffle=0)
    assert sorted(set(last.layer)) == [8]
    m = layer_similarity(path, layers_a=[4, 8])
    assert m.shape == (2, 3)
    with pytest.raises(AnalysisError, match=r"layer 2 does not exist: subset.h5 has layers 0, 4, 8"):
        layer_profile(path, layers=[2], n_boot=0, n_shuffle=0)
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), ["analyze", str(path), "--layers", "4,8", "--n-boot", "5", "--n-shuffle", "2",
                                      "--n-jobs", "1", "--level", "center", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "profile.csv")
    assert sorted(set(table.layer)) == [4, 8]
    sim = pd.read_csv(out / "similarity_subset_subset.csv")
    assert sorted(set(sim.layer_a)) == [4, 8] and sorted(set(sim.layer_b)) == [4, 8]


def test_report_names_the_non_standard_choices(store, tmp_path):
    from probes.analysis import run_analysis

    res = run_analysis([store], nuisances=("group",), methods=("svcca", "pwcca", "cka"), layers=[2], n_boot=5,
                       n_shuffle=2, out=tmp_path / "o")
    text = (res.out / "analysis.md").read_text()
    for phrase in ("SVCCA dimension cap", "at most min(50, n/10) dimensions", "99 % of its variance",
                   "Held-out CCA", "PWCCA weighting side", "*layer's*", "Interval method", "5 draws",
                   "median equals the estimate", "Shuffled floor", "2 permutations"):
        assert phrase in text, phrase

"""The synthetic sibilant set: manifest, shape of the data, determinism, and that it is learnable."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from featstore.encoders.frontends import LogMelEncoder
from featstore.synthetic import CLASS_PROBS, CLASSES, class_names, make_sibilant_set

SR = 16000


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, list[np.ndarray]]:
    manifest = make_sibilant_set(tmp_path_factory.mktemp("sib"), n_speakers=40, clips_per_speaker=3, seed=0)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    audio = [sf.read(manifest.parent / p, dtype="float32")[0] for p in df["path"]]
    return manifest, df, audio


@pytest.fixture(scope="module")
def context_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, list[np.ndarray]]:
    manifest = make_sibilant_set(tmp_path_factory.mktemp("ctx"), n_speakers=6, clips_per_speaker=4, seed=3,
                                 context=True)
    df = pd.read_csv(manifest)
    return df, [sf.read(manifest.parent / p, dtype="float32")[0] for p in df["path"]]


def test_class_names() -> None:
    assert class_names() == ["Normal", "Lateral", "Interdental"] == list(CLASSES)
    assert CLASS_PROBS == (0.25, 0.55, 0.20)


def test_manifest_columns_rows_and_files(small_set) -> None:
    manifest, df, audio = small_set
    with manifest.open() as fh:
        assert next(csv.reader(fh)) == ["id", "path", "label", "speaker", "sex", "age"]
    assert len(df) == 120 and df["id"].is_unique and df["speaker"].nunique() == 40
    assert df["id"].iloc[4] == "spk001_001" and df["path"].iloc[4] == "wav/spk001_001.wav"
    assert set(df["sex"]) == {"F", "M"} and df["age"].astype(int).between(4, 9).all()
    info = sf.info(manifest.parent / df["path"].iloc[0])
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
    assert all(np.isfinite(a).all() and 0 < np.abs(a).max() < 1.0 for a in audio)


def test_label_proportions(small_set, tmp_path: Path) -> None:
    _, df, _ = small_set
    shares = df["label"].value_counts(normalize=True)
    assert shares.to_dict() == pytest.approx({"Normal": 0.25, "Lateral": 0.55, "Interdental": 0.20}, abs=1e-9)
    odd = pd.read_csv(make_sibilant_set(tmp_path, n_speakers=17, clips_per_speaker=1, seed=1))
    counts = odd["label"].value_counts()
    assert counts.to_dict() == {"Lateral": 9, "Normal": 4, "Interdental": 4}  # largest remainder of 4.25/9.35/3.4
    tiny = pd.read_csv(make_sibilant_set(tmp_path / "tiny", n_speakers=3, clips_per_speaker=1))
    assert sorted(tiny["label"]) == sorted(CLASSES)  # every class gets a speaker


def test_durations(small_set) -> None:
    _, _, audio = small_set
    dur = np.array([len(a) for a in audio]) / SR
    assert dur.min() >= 0.08 and dur.max() <= 0.25
    assert 0.13 <= np.median(dur) <= 0.17
    assert dur.std() > 0.015  # lengths vary


def test_one_label_per_speaker(small_set) -> None:
    _, df, _ = small_set
    per_speaker = df.groupby("speaker")[["label", "sex", "age"]].nunique()
    assert (per_speaker == 1).all().all()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_sibilant_set(tmp_path / "a", n_speakers=4, clips_per_speaker=3, seed=7, context=True)
    b = make_sibilant_set(tmp_path / "b", n_speakers=4, clips_per_speaker=3, seed=7, context=True)
    c = make_sibilant_set(tmp_path / "c", n_speakers=4, clips_per_speaker=3, seed=8, context=True)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    df = pd.read_csv(a)
    assert len(df) == 12
    for p in df["path"]:
        assert (a.parent / p).read_bytes() == (b.parent / p).read_bytes() != (c.parent / p).read_bytes()


def test_context_segments(context_set) -> None:
    df, audio = context_set
    assert list(df.columns) == ["id", "path", "label", "speaker", "sex", "age", "start", "end"]
    dur = np.array([len(a) for a in audio]) / SR
    seg = (df["end"] - df["start"]).to_numpy()
    assert (dur >= 0.4).all() and (dur <= 0.8).all()
    assert (df["start"] > 0).all() and (df["end"] < dur).all()
    assert (seg >= 0.08 - 1e-9).all() and (seg <= 0.25 + 1e-9).all()
    # the segment is the fricative: more of its energy lies above 3 kHz than in the rest of the word
    for a, s, e in zip(audio, df["start"], df["end"]):
        i, j = int(round(s * SR)), int(round(e * SR))
        inside, outside = a[i:j], np.concatenate([a[:i], a[j:]])
        assert _hf_share(inside) > _hf_share(outside)


def _hf_share(x: np.ndarray) -> float:
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(p[f > 3000].sum() / p.sum())


def _grouped_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with threadpool_limits(1):  # tiny problem: BLAS threads only stall on a busy machine
        pred = cross_val_predict(clf, x, y, groups=groups, cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
    return balanced_accuracy_score(y, pred)


def test_learnable_under_speaker_grouped_cv(small_set) -> None:
    _, df, audio = small_set
    frames = [layers[0] for layers in LogMelEncoder().encode(audio)]
    x = np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in frames])
    y, groups = df["label"].to_numpy(), df["speaker"].to_numpy()
    score = _grouped_cv(x, y, groups)
    assert score > 0.65, score  # chance: 1/3
    per_speaker = df.groupby("speaker")["label"].first()
    shuffled = []
    for r in range(3):  # control: labels shuffled across speakers (still one per speaker)
        perm = dict(zip(per_speaker.index, np.random.default_rng(r).permutation(per_speaker.to_numpy())))
        shuffled.append(_grouped_cv(x, df["speaker"].map(perm).to_numpy(), groups))
    assert np.mean(shuffled) < 0.45, shuffled
    assert score > np.mean(shuffled) + 0.25


@pytest.mark.parametrize("kwargs,message", [
    ({"n_speakers": 2}, "n_speakers must be an integer >= 3 (one per class), got 2"),
    ({"clips_per_speaker": 0}, "clips_per_speaker must be an integer >= 1, got 0"),
    ({"sample_rate": 8000}, "sample_rate must be an integer >= 16000 (the peaks reach 8 kHz), got 8000"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make_sibilant_set(tmp_path, **kwargs)
    assert str(err.value) == message

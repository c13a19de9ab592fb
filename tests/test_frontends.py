"""Acoustic front ends: framing, shapes, padding-exactness, and that the numbers mean what they say."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import butter, sosfilt

from featstore.encoders.base import Encoder
from featstore.encoders.frontends import (
    FRONTENDS, LogMelEncoder, MFCCEncoder, SpectralEncoder, delta, make_frontend,
)
from featstore.encoders.registry import FRONTEND_NAMES

SR = 16000


def tone(freq: float, seconds: float = 0.25, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (400, 1280, 2399, 4000, 561)]


@pytest.mark.parametrize("name", ["logmel", "mfcc", "spectral"])
@pytest.mark.parametrize("n,expected", [(0, 0), (1, 0), (399, 0), (400, 1), (401, 1), (559, 1), (560, 2),
                                        (719, 2), (720, 3), (2400, 13), (16000, 98)])
def test_num_frames_boundaries(name: str, n: int, expected: int) -> None:
    enc = make_frontend(name)
    assert enc.num_frames(n) == expected
    x = np.zeros(n, np.float32)
    assert all(a.shape[0] == expected for a in enc.encode([x])[0])


def test_num_frames_other_window() -> None:
    enc = LogMelEncoder(win=512, hop=128)
    assert [enc.num_frames(n) for n in (511, 512, 639, 640, 1024)] == [0, 1, 1, 2, 5]
    assert enc.min_samples() == 512
    with pytest.raises(ValueError, match="num_samples must be >= 0, got -1"):
        enc.num_frames(-1)


def test_frame_geometry_and_describe() -> None:
    enc = LogMelEncoder()
    assert isinstance(enc, Encoder)
    assert enc.min_samples() == 400
    np.testing.assert_array_equal(enc.frame_centers(3), [200.0, 360.0, 520.0])
    d = enc.describe()
    assert (d["encoder"], d["encoder_revision"], d["sample_rate"]) == ("logmel", "frontend-v1", 16000)
    assert (d["frame_stride_samples"], d["receptive_field_samples"], d["first_frame_center_samples"]) == (160, 400, 200.0)
    assert d["padding_exact"] is True
    assert d["encoder_config"]["n_mels"] == 64 and d["encoder_config"]["n_fft"] == 512
    assert enc.padding_audit([np.zeros(800)]) == {}


@pytest.mark.parametrize("name,options,dims", [
    ("logmel", {}, [64]),
    ("logmel", {"n_mels": 40, "fmax": 7600.0}, [40]),
    ("mfcc", {}, [20, 60]),
    ("mfcc", {"n_mfcc": 13, "deltas": False}, [13]),
    ("spectral", {}, [16, 6]),
    ("spectral", {"n_bands": 24, "band_scale": "mel"}, [24, 6]),
])
def test_shapes_dims_dtype(clips: list[np.ndarray], name: str, options: dict, dims: list[int]) -> None:
    enc = make_frontend(name, **options)
    assert enc.layer_dims == dims and enc.num_layers == len(dims) and len(enc.layer_names) == len(dims)
    out = enc.encode(clips)
    assert len(out) == len(clips)
    for clip, layers in zip(clips, out):
        assert [a.shape for a in layers] == [(enc.num_frames(len(clip)), d) for d in dims]
        assert all(a.dtype == np.float32 and a.flags["C_CONTIGUOUS"] for a in layers)
        assert all(np.isfinite(a).all() for a in layers)


@pytest.mark.parametrize("name", ["logmel", "mfcc", "spectral"])
def test_silence_is_finite(name: str) -> None:
    layers = make_frontend(name).encode([np.zeros(1600, np.float32)])[0]
    assert all(np.isfinite(a).all() for a in layers)
    if name == "logmel":
        np.testing.assert_allclose(layers[0], np.log(1e-10), rtol=1e-6)
    if name == "spectral":
        np.testing.assert_allclose(layers[0], np.log(1e-10), rtol=1e-6)
        # flat (floored) spectrum: centroid at the middle of 0..8 kHz, no skew
        np.testing.assert_allclose(layers[1][:, 0], 4.0, atol=1e-6)
        np.testing.assert_allclose(layers[1][:, 2], 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["logmel", "mfcc", "spectral"])
def test_batched_equals_solo_exactly(clips: list[np.ndarray], name: str) -> None:
    enc = make_frontend(name)
    batched = enc.encode(clips)
    reordered = enc.encode(clips[::-1])[::-1]
    for i, clip in enumerate(clips):
        solo = enc.encode([clip])[0]
        padded = enc.encode([np.concatenate([clip, np.zeros(3000, np.float32)])])[0]
        t = enc.num_frames(len(clip))
        for k in range(enc.num_layers):
            np.testing.assert_array_equal(batched[i][k], solo[k])
            np.testing.assert_array_equal(reordered[i][k], solo[k])
            # frames are local: zero padding only adds frames after the clip's own (deltas look ±4)
            keep = max(t - 4, 0) if (name, k) == ("mfcc", 1) else t
            np.testing.assert_array_equal(padded[k][:keep], solo[k][:keep])


def test_one_khz_tone_peaks_at_one_khz() -> None:
    x = tone(1000.0)
    enc = LogMelEncoder()
    fb = enc.mel_fb
    centres = (fb * enc.freqs[:, None]).sum(0) / fb.sum(0)
    peak_band = int(enc.encode([x])[0][0].mean(0).argmax())
    assert abs(centres[peak_band] - 1000.0) < 40.0
    moments = SpectralEncoder().encode([x])[0][1]
    centroid, spread, _, kurt, _, peak = moments.mean(0)
    assert abs(centroid - 1.0) < 0.01  # kHz
    assert spread < 0.05
    assert peak == pytest.approx(1.0)  # 1000 Hz is FFT bin 32 of 512 at 16 kHz
    assert kurt > 2.0
    bands = SpectralEncoder().encode([x])[0][0].mean(0)
    assert int(bands.argmax()) == 2  # 500-Hz-wide linear bands: 1000 Hz lies in [1000, 1500)


def test_highpassed_noise_has_higher_centroid_than_lowpassed() -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(SR // 2)
    high = sosfilt(butter(6, 4000, "highpass", fs=SR, output="sos"), noise)
    low = sosfilt(butter(6, 1500, "lowpass", fs=SR, output="sos"), noise)
    enc = SpectralEncoder()
    (bh, mh), (bl, ml) = enc.encode([high, low])
    assert mh[:, 0].mean() > 5.0 and ml[:, 0].mean() < 1.5  # centroids, kHz
    assert (mh[:, 0] > ml[:, 0]).all()
    assert mh[:, 4].mean() > 0 > ml[:, 4].mean()  # spectral slope, dB/kHz
    assert bh[:, 12:].mean() > bl[:, 12:].mean() + 5 and bl[:, :2].mean() > bh[:, :2].mean() + 5


def test_mfcc_layers_and_deltas() -> None:
    x = tone(440.0, 0.3) + 0.01 * np.random.default_rng(2).standard_normal(4800).astype(np.float32)
    mfcc, full = MFCCEncoder().encode([x])[0]
    np.testing.assert_array_equal(full[:, :20], mfcc)
    # c0 of the orthonormal DCT-II is the sum of the log-Mel energies / sqrt(n_mels)
    logmel = LogMelEncoder(n_mels=40).encode([x])[0][0]
    np.testing.assert_allclose(mfcc[:, 0], logmel.astype(np.float64).sum(1) / np.sqrt(40), rtol=1e-5)
    ramp = 2.0 * np.arange(8, dtype=np.float64)[:, None]
    np.testing.assert_allclose(delta(ramp)[2:-2, 0], 2.0)
    np.testing.assert_allclose(delta(ramp)[[0, -1], 0], [1.0, 1.0])  # edges replicated: (1*2 + 2*4) / 10
    np.testing.assert_array_equal(delta(np.ones((5, 3))), np.zeros((5, 3)))
    assert delta(np.zeros((0, 3))).shape == (0, 3)


def test_make_frontend_registry_and_roundtrip() -> None:
    assert tuple(FRONTENDS) == FRONTEND_NAMES
    for name in FRONTENDS:
        enc = make_frontend(name)
        again = make_frontend(enc.name, **enc.config)
        assert type(again) is type(enc) and again.config == enc.config and again.name == name


def test_bad_options_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"^unknown front end 'fbank'; choose one of: logmel, mfcc, spectral$"):
        make_frontend("fbank")
    with pytest.raises(ValueError, match=r"^unknown option\(s\) for front end 'logmel': n_mfcc; accepted: n_mels, "):
        make_frontend("logmel", n_mfcc=13)
    with pytest.raises(ValueError, match=r"need 0 <= fmin < fmax <= Nyquist \(8000 Hz\), got fmin=0.0, fmax=9000"):
        make_frontend("logmel", fmax=9000)
    with pytest.raises(ValueError, match=r"n_mfcc must be an integer in \[1, n_mels=40\], got 41"):
        make_frontend("mfcc", n_mfcc=41)
    with pytest.raises(ValueError, match="band_scale must be 'linear' or 'mel', got 'bark'"):
        make_frontend("spectral", band_scale="bark")
    with pytest.raises(ValueError, match="n_fft must be an integer >= win"):
        make_frontend("logmel", n_fft=256)
    with pytest.raises(ValueError, match="hop must be an integer >= 1, got 0"):
        make_frontend("mfcc", hop=0)
    with pytest.raises(ValueError, match="hold no FFT bin"):
        make_frontend("logmel", n_mels=200)
    enc = make_frontend("logmel")
    with pytest.raises(ValueError, match=r"clip 1: expected a 1-D mono signal, got shape \(2, 800\)"):
        enc.encode([np.zeros(800), np.zeros((2, 800))])
    with pytest.raises(ValueError, match="clip 0: contains NaN or inf samples"):
        enc.encode([np.full(800, np.nan)])

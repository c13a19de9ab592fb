"""Whisper encoder: frame rule, HF equivalence, batching, the context window, provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.encoders.registry import load_encoder
from featstore.encoders.whisper import WhisperEncoder

SHARED_WHISPER = Path(__file__).resolve().parents[2] / "shared/models/whisper-tiny.en"
D_MODEL = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=D_MODEL, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64, max_target_positions=16, max_source_positions=1500,
        num_mel_bins=80, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    model = WhisperModel(config)
    # larger weights than the 0.02-std init so that attention (and thus the window) matters
    with torch.no_grad():
        for layer in model.encoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                lin.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-whisper")
    model.save_pretrained(path)
    WhisperFeatureExtractor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def enc(tiny_dir) -> WhisperEncoder:
    return load_encoder(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def enc_ctx(tiny_dir) -> WhisperEncoder:
    return load_encoder(str(tiny_dir), device="cpu", context_seconds=1.0)


def _clips(lengths, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(max(lengths)) / 16000
    out = []
    for n in lengths:
        tone = np.sin(2 * np.pi * rng.uniform(150, 3000) * t[:n])
        out.append((0.3 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


def _hf_hidden_states(enc: WhisperEncoder, clips) -> list[np.ndarray]:
    feats = enc.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hs = enc.encoder(feats, output_hidden_states=True).hidden_states
    return [h.numpy() for h in hs]


def test_frame_rule_on_boundaries(enc):
    lengths = [0, 1, 319, 320, 321, 640, 641, 2400, 2560, 2561, 480000]
    assert [enc.num_frames(n) for n in lengths] == [0, 1, 1, 1, 2, 2, 3, 8, 8, 9, 1500]
    assert enc.min_samples() == 1
    assert enc.max_samples == 480000


def test_frame_rule_matches_hf_mask_arithmetic(enc):
    from transformers import WhisperModel

    for n in (1, 159, 160, 161, 320, 321, 4799, 4800, 4801):
        mask = enc.feature_extractor(np.zeros(n, np.float32), sampling_rate=16000, return_attention_mask=True).attention_mask
        mel = int(np.asarray(mask).sum())
        hf = int(WhisperModel._get_feat_extract_output_lengths(None, torch.tensor(mel)))
        assert enc.num_frames(n) == hf == -(-n // 320), n


def test_geometry_and_provenance(enc, tiny_dir):
    assert enc.num_layers == 3  # embeddings + 2 layers
    assert enc.layer_dims == [D_MODEL] * 3
    attrs = enc.describe()
    assert attrs["encoder"] == str(tiny_dir)
    assert attrs["encoder_revision"].startswith("sha256:")
    assert attrs["sample_rate"] == 16000
    assert attrs["frame_stride_samples"] == 320
    assert attrs["receptive_field_samples"] == 1040
    assert attrs["first_frame_center_samples"] == 0.0
    assert attrs["padding_exact"] is True
    assert attrs["whisper_window_mode"] == "full-30s"
    assert attrs["whisper_window_seconds"] == 30.0
    assert attrs["whisper_context_seconds"] is None
    config = json.loads(json.dumps(attrs["encoder_config"]))
    assert config["d_model"] == D_MODEL and config["encoder_layers"] == 2
    assert config["window_positions"] == 1500 and config["feature_extractor"]["hop_length"] == 160
    assert "mel_filters" not in config["feature_extractor"]


def test_log_mel_equals_feature_extractor(enc):
    clips = _clips([2400, 16000, 15900, 16100, 50]) + [np.zeros(800, np.float32)]
    ref = enc.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    np.testing.assert_allclose(enc.log_mel(clips).numpy(), ref.numpy(), atol=1e-5)
    # shortened windows are exact slices of the 30-s log-Mel (clips up to the window length)
    short = clips[:3] + clips[4:]
    ref_short = enc.feature_extractor(short, sampling_rate=16000, return_tensors="pt").input_features
    for positions in (50, 100):
        got = enc.log_mel(short, positions=positions).numpy()
        assert got.shape == (len(short), 80, 2 * positions)
        np.testing.assert_allclose(got, ref_short[..., : 2 * positions].numpy(), atol=1e-5)


def test_forward_matches_hf_at_full_window(enc):
    clips = _clips([2400, 4000, 16000])
    hf = _hf_hidden_states(enc, clips)
    out = enc.encode(clips)
    assert len(hf) == 3
    for b, clip in enumerate(clips):
        n = enc.num_frames(len(clip))
        for k in range(3):
            assert out[b][k].shape == (n, D_MODEL) and out[b][k].dtype == np.float32
            np.testing.assert_allclose(out[b][k], hf[k][b, :n], atol=1e-4)
    # the last hidden state carries the final layer norm (unit variance over channels), the others do not
    last = out[0][2]
    assert np.allclose(last.mean(1), enc.encoder.layer_norm.bias.detach().numpy().mean(), atol=1e-3)
    assert not np.allclose(out[0][1].std(1), last.std(1), atol=1e-2)


@pytest.mark.parametrize("which", ["enc", "enc_ctx"])
def test_batched_equals_solo(which, request):
    encoder = request.getfixturevalue(which)
    clips = _clips([2400, 1600, 8000, 321, 16000])
    batched = encoder.encode(clips)
    for clip, got in zip(clips, batched):
        solo = encoder.encode([clip])[0]
        assert [a.shape for a in got] == [(encoder.num_frames(len(clip)), D_MODEL)] * 3
        for a, b in zip(got, solo):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_chunking_does_not_change_frames(tiny_dir, enc):
    small = WhisperEncoder(tiny_dir, device="cpu", max_batch_positions=1)
    clips = _clips([2400, 4800, 800])
    for x, y in zip(small.encode(clips), enc.encode(clips)):
        for a, b in zip(x, y):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_context_window(enc, enc_ctx):
    assert enc_ctx.describe()["whisper_window_mode"] == "context"
    assert enc_ctx.extra_attrs["whisper_context_seconds"] == 1.0
    assert enc_ctx.extra_attrs["whisper_window_seconds"] == 1.0
    assert enc_ctx.config["window_positions"] == 50 and enc_ctx.max_samples == 16000
    clips = _clips([2400, 8000])
    full, ctx = enc.encode(clips), enc_ctx.encode(clips)
    for f, c, clip in zip(full, ctx, clips):
        assert [a.shape for a in c] == [(enc.num_frames(len(clip)), D_MODEL)] * 3
        # embeddings are local (conv + positions): identical while the clip stays off the window's edge
        np.testing.assert_allclose(c[0], f[0], atol=1e-5)
        # attention sees 1 s instead of 30 s of context: the layers move
        assert np.abs(c[1] - f[1]).max() > 1e-2
        assert np.abs(c[2] - f[2]).max() > 1e-2


def test_context_of_full_length_is_the_full_window(tiny_dir, enc):
    same = load_encoder(str(tiny_dir), device="cpu", context_seconds=30)
    assert same.extra_attrs["whisper_window_mode"] == "full-30s" and same.positions == 1500
    clip = _clips([3000])
    for a, b in zip(same.encode(clip)[0], enc.encode(clip)[0]):
        np.testing.assert_array_equal(a, b)


def test_padding_audit(enc, enc_ctx):
    clips = _clips([2400, 4000])
    assert enc.padding_audit(clips) == {}
    audit = enc_ctx.padding_audit(clips)
    assert audit["reference"] == "full-30s" and audit["context_seconds"] == 1.0
    assert audit["clips"] == 2 and audit["frames"] == 8 + 13
    assert len(audit["max_abs"]) == len(audit["mean_cosine"]) == 3
    assert audit["max_abs"][0] < 1e-5 and audit["mean_cosine"][0] > 0.999999
    assert audit["max_abs"][1] > 1e-2 and audit["mean_cosine"][2] < 0.9999
    # the clips' frames given (an extraction reads them back from its store): the same audit
    assert enc_ctx.padding_audit(clips, frames=enc_ctx.encode(clips)) == audit


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "context_seconds must be in (0, 30], got 0"),
        (31, "context_seconds must be in (0, 30], got 31"),
        (0.015, "context_seconds must be a multiple of 0.02 s (one encoder frame), got 0.015"),
        ("abc", "context_seconds must be a number of seconds, got 'abc'"),
    ],
)
def test_bad_context_seconds(tiny_dir, value, message):
    with pytest.raises(ValueError) as err:
        load_encoder(str(tiny_dir), device="cpu", context_seconds=value)
    assert str(err.value) == message


def test_clip_longer_than_window(enc_ctx, enc):
    with pytest.raises(ValueError) as err:
        enc_ctx.encode(_clips([16000, 16001]))
    assert str(err.value) == (
        "clip 1 has 16001 samples (1.00 s), longer than the Whisper window of 1 s; "
        "raise context_seconds or cut the clip"
    )
    with pytest.raises(ValueError, match=r"clip 0 has 480001 samples \(30.00 s\), longer than the Whisper window of 30 s; cut the clip$"):
        enc.encode([np.zeros(480001, np.float32)])


def test_missing_feature_extractor(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no preprocessor_config.json"):
        WhisperEncoder(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny_dir, enc):
    gpu = load_encoder(str(tiny_dir), device="cuda")
    clips = _clips([2400, 4000])
    for x, y in zip(gpu.encode(clips), enc.encode(clips)):
        for a, b in zip(x, y):
            np.testing.assert_allclose(a, b, atol=1e-3)


def test_real_whisper_tiny_en():
    if not SHARED_WHISPER.is_dir():
        pytest.skip(f"{SHARED_WHISPER} not present")
    real = load_encoder(str(SHARED_WHISPER), device="cpu", context_seconds=2)
    assert real.layer_dims == [384] * 5
    clip = _clips([2400])[0]
    out = real.encode([clip])[0]
    assert [a.shape for a in out] == [(8, 384)] * 5
    assert all(np.isfinite(a).all() for a in out)
    # pretrained layers are far from the random-init scale, and the last one is layer-normed
    assert 0.5 < float(np.abs(out[4]).mean()) < 5.0
    assert real.describe()["encoder_config"]["d_model"] == 384


def test_stats_count_window_padding(enc_ctx):
    before = dict(enc_ctx.stats)
    enc_ctx.encode(_clips([2400, 4000]))
    assert enc_ctx.stats["clips"] - before["clips"] == 2
    assert enc_ctx.stats["frames"] - before["frames"] == 8 + 13
    assert enc_ctx.stats["padded_frames"] - before["padded_frames"] == 2 * 50 - 21


def test_outputs_are_not_reused_by_the_next_encode(enc):
    from tests.test_extract import _held_outputs_survive_the_next_encode

    _held_outputs_survive_the_next_encode(enc)

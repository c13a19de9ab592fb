"""The transformers-free extraction path (featstore/encoders/ssl_native.py) against transformers itself."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from featstore.encoders.hf_ssl import SSLEncoder
from featstore.encoders.ssl_native import (NativeUnsupported, RecipeInputs, _normalise_keys, load_native,
                                           packed_forward, unsupported_reason)
from tests.conftest import ROOT, save_tiny

LAYOUTS = {
    "wavlm": ("wavlm", {}),
    "wavlm-stable": ("wavlm", dict(feat_extract_norm="layer", do_stable_layer_norm=True)),
    "wav2vec2": ("wav2vec2", {}),
    "wav2vec2-stable": ("wav2vec2", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert": ("hubert", {}),
    "hubert-no-proj-norm": ("hubert", dict(feat_proj_layer_norm=False)),
    "wav2vec2-even-pos": ("wav2vec2", dict(num_conv_pos_embeddings=15)),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {k: save_tiny(kind, root / k, **over) for k, (kind, over) in LAYOUTS.items()}


def _clips(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.normal(size=int(rng.integers(1400, 5200)))).astype(np.float32) for _ in range(n)]


def _hf_solo(enc, clip):
    """transformers' forward of one clip alone (the reference)."""
    x = torch.from_numpy(enc.preprocess(clip))[None]
    with torch.inference_mode():
        hs = enc.model(x, output_hidden_states=True).hidden_states
    return [h[0].numpy() for h in hs]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_transformers_solo(layouts, layout):
    enc = SSLEncoder(layouts[layout])
    assert enc.packed and enc._model is None and enc.extra_attrs["transformer_kernel"] == "packed"
    clips = _clips()
    got = enc.encode(clips)  # one packed batch of six lengths
    for clip, per_layer in zip(clips, got):
        ref = _hf_solo(enc, clip)
        assert len(per_layer) == len(ref) == 3
        for g, r in zip(per_layer, ref):
            assert g.shape == r.shape == (enc.num_frames(len(clip)), 32)
            assert np.abs(g - r).max() < 1e-5


def test_equal_lengths_share_one_attention_call_and_stay_exact(layouts):
    enc = SSLEncoder(layouts["wavlm"])
    rng = np.random.default_rng(3)
    clips = [(0.1 * rng.normal(size=3200)).astype(np.float32) for _ in range(3)] + _clips(2)
    got = enc.encode(clips)
    for clip, per_layer in zip(clips, got):
        for g, r in zip(per_layer, _hf_solo(enc, clip)):
            assert np.abs(g - r).max() < 1e-5


def test_layer_subset_and_too_short_clip(layouts):
    full = SSLEncoder(layouts["wav2vec2"])
    clips = _clips(3) + [np.zeros(300, np.float32)]  # the last is shorter than one frame
    a = full.encode(clips)
    for k in (0, 1):
        b = SSLEncoder(layouts["wav2vec2"], layers=[k]).encode(clips)
        assert [len(x) for x in b] == [1] * 4
        for x, y in zip(a[:3], b[:3]):
            assert np.array_equal(x[k], y[0])
        assert b[3][0].shape == (0, 32)


def test_extraction_imports_no_transformers(layouts, clip_set, tmp_path):
    """A whole extraction (CLI module, store written, padding audit) of a known layout never imports
    transformers (~3.5 s of start-up on two cores)."""
    code = ("import sys\n"
            "import featstore_cli.featstore_app\n"
            "from featstore.extract import extract\n"
            f"extract({str(clip_set)!r}, {str(layouts['wavlm'])!r}, {str(tmp_path / 's.h5')!r}, device='cpu')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    import h5py

    with h5py.File(tmp_path / "s.h5", "r") as h:
        assert h.attrs["transformer_kernel"] == "packed" and "padding_audit" in h.attrs


def test_model_loaded_later_is_shared(layouts):
    enc = SSLEncoder(layouts["hubert"])
    clips = _clips(2)
    before = enc.encode(clips)
    model = enc.model  # transformers' model: extraction now runs on its modules
    assert enc._net is model
    again = enc.encode(clips)
    for x, y in zip(before, again):
        for a, b in zip(x, y):
            assert np.abs(a - b).max() < 1e-6
    with torch.no_grad():
        model.encoder.layers[-1].final_layer_norm.bias += 1.0  # an in-place edit (as fine-tuning makes)
    edited = enc.encode(clips)
    assert np.abs(edited[0][-1] - before[0][-1] - 1.0).max() < 1e-5


@pytest.mark.parametrize("settings", [dict(do_normalize=True, return_attention_mask=True),
                                      dict(do_normalize=True, return_attention_mask=False),
                                      dict(do_normalize=False, return_attention_mask=True),
                                      dict(do_normalize=True, return_attention_mask=True, padding_value=0.5),
                                      dict(do_normalize=True, return_attention_mask=True, padding_side="left")])
def test_recipe_inputs_bit_identical_to_feature_extractor(settings):
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(**settings)
    clips = _clips(5, seed=2) + [np.ones(9000, np.float32)]  # the last is cut to the window
    ref = fe(clips, sampling_rate=16000, padding="max_length", max_length=6000, truncation=True, return_tensors="np")
    values, mask = RecipeInputs(settings).padded(clips, 6000)
    assert values.dtype == np.float32 and np.array_equal(values, ref["input_values"])
    if settings["return_attention_mask"]:
        assert np.array_equal(mask, ref["attention_mask"])
    else:
        assert mask is None and "attention_mask" not in ref


def test_unsupported_layouts_go_through_transformers(tiny_models):
    enc = SSLEncoder(tiny_models["data2vec-audio"])
    assert not enc.packed and enc.extra_attrs["transformer_kernel"] == "transformers"
    assert unsupported_reason({"model_type": "data2vec-audio"}) == "model_type 'data2vec-audio'"
    cfg = json.loads((tiny_models["wavlm"] / "config.json").read_text())
    assert unsupported_reason({**cfg, "hidden_act": "relu"}) == "hidden_act 'relu' (only gelu is implemented)"
    assert unsupported_reason({k: v for k, v in cfg.items() if k != "num_buckets"}) == "config.json lacks num_buckets"


def test_weights_of_another_shape_are_refused(layouts, tmp_path):
    cfg = json.loads((layouts["wav2vec2"] / "config.json").read_text())
    with pytest.raises(NativeUnsupported, match="has shape"):
        load_native({**cfg, "intermediate_size": 48}, layouts["wav2vec2"])
    with pytest.raises(NativeUnsupported, match="no single model.safetensors"):
        load_native(cfg, tmp_path)


def test_old_weight_norm_names_and_task_prefix():
    v, g = torch.randn(8, 4, 5), torch.rand(1, 1, 5) + 0.5
    sd = {"wav2vec2.feature_extractor.conv_layers.0.conv.weight": torch.zeros(1),
          "wav2vec2.encoder.pos_conv_embed.conv.weight_g": g, "wav2vec2.encoder.pos_conv_embed.conv.weight_v": v,
          "lm_head.weight": torch.zeros(1)}
    out = _normalise_keys(sd)
    assert sorted(out) == ["encoder.pos_conv_embed.conv.weight", "feature_extractor.conv_layers.0.conv.weight"]
    want = g * v / v.norm(dim=(0, 1), keepdim=True)
    assert torch.allclose(out["encoder.pos_conv_embed.conv.weight"], want, atol=1e-6)


def test_packed_forward_rows_follow_offsets(layouts):
    enc = SSLEncoder(layouts["wavlm"])
    waves = [torch.from_numpy(enc.preprocess(c)) for c in _clips(4, seed=9)]
    with torch.inference_mode():
        feats = enc.cnn_outputs(waves)
        out, offsets = packed_forward(enc._net, enc.config, feats, [0, 2])
    counts = [f.shape[-1] for f in feats]
    assert out.shape == (2, sum(counts), 32)
    assert sorted(offsets) == [sum(sorted(counts)[:i]) for i in range(4)]  # clips laid end to end, shortest first


def test_fused_optimizer_step_is_seen_by_the_next_encode(layouts):
    """The fused AdamW kernel changes weights without bumping their version counter: a cache of
    rearranged weights keyed on the version went stale (validation during fine-tuning scored old
    weights). Trainable weights are rebuilt on every call."""
    enc = SSLEncoder(layouts["wavlm"])
    model = enc.model
    clips = _clips(3, seed=4)
    enc.encode(clips)  # fills any cache
    params = [p for n, p in model.named_parameters() if "attention" in n or "feature_extractor.conv_layers.1" in n]
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    waves = [torch.from_numpy(enc.preprocess(c)) for c in clips]
    hs, _ = enc.forward_hidden_states(waves)
    hs[-1].square().mean().backward()
    versions = [p._version for p in params]
    opt.step()
    assert [p._version for p in params] == versions  # the premise: no version bump
    got = enc.encode(clips)
    for clip, per_layer in zip(clips, got):
        for g, r in zip(per_layer, _hf_solo(enc, clip)):
            assert np.abs(g - r).max() < 1e-5


def test_scratch_reused_with_headroom():
    from featstore.encoders.ssl_native import scratch

    owner = torch.nn.Module()
    like = torch.zeros(1)
    a = scratch(owner, "x", 100, 8, like)
    b = scratch(owner, "x", 110, 8, like)  # 10 % more rows: the same memory
    assert a.shape == (100, 8) and b.shape == (110, 8) and a.data_ptr() == b.data_ptr()
    c = scratch(owner, "x", 200, 8, like)  # beyond the headroom: a new buffer
    assert c.shape == (200, 8) and c.data_ptr() != a.data_ptr()


@pytest.mark.parametrize("layout", ["wavlm", "wav2vec2-stable"])
def test_autocast_bf16_runs_and_stays_close(layouts, layout):
    """``--amp bf16`` (autocast; on the CPU here, as on a GPU): the GEMM CNN's in-place
    accumulation mixed a bf16 product with float32 operands and raised; now it runs, and the
    frames stay within bf16 rounding of the float32 ones."""
    clips = _clips(4, seed=8)
    ref = SSLEncoder(layouts[layout]).encode(clips)
    got = SSLEncoder(layouts[layout], amp="bf16").encode(clips)
    for g_clip, r_clip in zip(got, ref):
        for g, r in zip(g_clip, r_clip):
            assert g.dtype == np.float32 and g.shape == r.shape
            assert np.abs(g - r).max() <= 0.1 * max(1.0, float(np.abs(r).max()))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pytorch_model_bin_with_old_names_and_formats(layouts, tmp_path, zipfile):
    """A ``pytorch_model.bin`` as older checkpoints ship it: a task model's prefix, ``weight_g`` /
    ``weight_v``, and (``zipfile=False``) torch's legacy serialisation, which cannot be memory-mapped."""
    import shutil

    from safetensors.torch import load_file

    src = layouts["wav2vec2"]
    d = tmp_path / "old"
    d.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / f, d / f)
    sd = load_file(str(src / "model.safetensors"))
    g = sd.pop("encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    v = sd.pop("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    old = {"wav2vec2." + k: t for k, t in sd.items()}
    old["wav2vec2.encoder.pos_conv_embed.conv.weight_g"], old["wav2vec2.encoder.pos_conv_embed.conv.weight_v"] = g, v
    old["lm_head.weight"] = torch.zeros(4, 32)
    torch.save(old, d / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    clips = _clips(2)
    want = SSLEncoder(src).encode(clips)
    enc = SSLEncoder(d)
    assert enc.packed and enc._model is None
    for x, y in zip(enc.encode(clips), want):
        for a, b in zip(x, y):
            assert np.abs(a - b).max() < 1e-6


def test_cache_follows_replaced_weights(layouts):
    """Weights assigned anew (``load_state_dict(assign=True)``) are new tensors: the rearranged
    copies follow them, even if a new tensor lands where a freed one was."""
    enc = SSLEncoder(layouts["wav2vec2"])
    clips = _clips(2)
    before = enc.encode(clips)
    sd = {k: v.clone() * (1.5 if k.endswith("q_proj.weight") or "conv_layers.1" in k else 1.0)
          for k, v in enc._net.state_dict().items()}
    enc._net.load_state_dict(sd, assign=True)
    for p in enc._net.parameters():
        p.requires_grad_(False)
    after = enc.encode(clips)
    model = enc.model  # transformers' model of the same checkpoint, given the same new weights
    model.load_state_dict(sd, strict=False)
    for clip, per_layer in zip(clips, after):
        for g, r in zip(per_layer, _hf_solo(enc, clip)):
            assert np.abs(g - r).max() < 1e-5
    assert np.abs(after[0][-1] - before[0][-1]).max() > 1e-3


@pytest.mark.parametrize("layers,products", [([0], 0), ([1], 4), ([0, 2], 8)])
def test_layers_above_the_highest_asked_are_not_computed(layouts, monkeypatch, layers, products):
    """Each transformer layer makes four products through ``_linear_into`` (q/k/v, output, two
    feed-forward); with ``layers=[0]`` the packed forward computed layer 1 as well."""
    import featstore.encoders.ssl_native as native

    calls = []
    real = native._linear_into
    monkeypatch.setattr(native, "_linear_into", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    SSLEncoder(layouts["wav2vec2"], layers=layers).encode(_clips(2))
    assert len(calls) == products

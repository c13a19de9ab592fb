"""Fast paths of the SSL encoders against the Hugging Face forward: the CNN as matrix products
(group norm folded per clip), the cropped positional convolution, WavLM's attention without
weights. Tiny models from configs; every fast path is checked against the model's own modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.encoders.hf_ssl import (SSLEncoder, _pos_conv_cropped, cnn_slots, constant_tail, fast_transformer, gemm_cnn, gemm_cnn_supported,
                                       masked_group_norm_cnn, pos_conv_croppable, wavlm_attention_fast,
                                       wavlm_attention_swappable)
from tests.conftest import save_tiny

KINDS = ["wavlm", "wav2vec2", "wav2vec2-layer", "hubert"]
SIZES = [16000, 400, 719, 1040, 4000, 3333]  # one batch: up to 40x padding, 1..49 frames


def _waves(seed: int = 3, offset: float = 0.0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy((offset + 0.1 * rng.normal(size=n)).astype(np.float32)) for n in SIZES]


@pytest.fixture(scope="module")
def biased_layer_norm_model(tmp_path_factory):
    """A layer-norm CNN with conv biases (wav2vec2-large-lv60's layout)."""
    return save_tiny("wav2vec2-layer", tmp_path_factory.mktemp("m") / "ln-bias", conv_bias=True)


@pytest.mark.parametrize("kind", KINDS + ["ln-bias"])
def test_gemm_cnn_equals_the_feature_encoder_on_each_clip_alone(tiny_models, biased_layer_norm_model, kind):
    enc = SSLEncoder(biased_layer_norm_model if kind == "ln-bias" else tiny_models[kind])
    fe = enc.model.feature_extractor
    assert gemm_cnn_supported(fe) and enc.cnn_gemm and enc.extra_attrs["cnn_kernel"] == "gemm"
    waves = _waves(offset=0.3)  # a DC offset: the folded group-norm mean must remove it
    with torch.inference_mode():
        out, counts = gemm_cnn(fe, waves)
        assert counts == [0 if n < 400 else (n - 400) // 320 + 1 for n in SIZES] == [49, 1, 1, 3, 12, 10]
        worst = 0.0
        for w, o in zip(waves, out):
            solo = fe(w[None])[0]
            assert o.shape == solo.shape
            worst = max(worst, float((o - solo).abs().max()))
        assert worst <= 1e-5
        if enc.group_norm_cnn:
            masked, _ = masked_group_norm_cnn(fe, waves)
            assert max(float((o - masked[i, :, :c]).abs().max()) for i, (o, c) in enumerate(zip(out, counts))) <= 1e-5


def test_cnn_slots_hold_what_each_clip_frames_read_and_no_more(tiny_models):
    """Clips packed end to end: each slot starts on a whole row of every layer (a multiple of the
    total stride, 320) and holds the samples its frames read, (frames - 1) * 320 + 400, rounded up
    -- not the batch's longest clip (a batch of one 1-s clip and short ones computed ~10 % more
    CNN rows than the clips alone)."""
    layers = list(SSLEncoder(tiny_models["wavlm"]).model.feature_extractor.conv_layers)
    sizes = [16000, 399, 400, 719, 720, 1040, 2400, 3333]
    offsets, slots, frames, computed = cnn_slots(layers, sizes)
    assert computed == frames
    assert frames == [0 if n < 400 else (n - 400) // 320 + 1 for n in sizes] == [49, 0, 1, 1, 2, 3, 7, 10]
    assert slots == [16000, 0, 640, 640, 960, 1280, 2560, 3520]
    for f, slot in zip(frames, slots):
        assert slot % 320 == 0 and (f == 0) == (slot == 0)
        assert f == 0 or (f - 1) * 320 + 400 <= slot < (f - 1) * 320 + 400 + 320
    assert offsets == [0, 16000, 16000, 16640, 17280, 18240, 19520, 22080]
    assert sum(slots) < len(sizes) * 16000 / 3


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2-layer"])
def test_gemm_cnn_packed_clips_read_neither_their_neighbours_nor_lose_their_tails(tiny_models, kind):
    """Loud clips beside quiet ones, and tails (samples no frame reads) far louder than the rest:
    each clip's frames still equal its solo run -- a clip's rows never read the next slot, and the
    first layer's group norm still spans the whole clip, tail included (the tail moves its mean
    and variance)."""
    fe = SSLEncoder(tiny_models[kind]).model.feature_extractor
    rng = np.random.default_rng(5)
    sizes = [2400, 719, 3333, 1040, 2550, 400]
    waves = []
    for i, n in enumerate(sizes):
        w = (0.01 if i % 2 else 5.0) * rng.normal(size=n)
        used = ((n - 400) // 320) * 320 + 400
        w[used:] = 40.0 * rng.normal(size=n - used) + 3.0  # read by no frame; in the group norm's statistics
        waves.append(torch.from_numpy(w.astype(np.float32)))
    with torch.inference_mode():
        out, counts = gemm_cnn(fe, waves)
        for w, o in zip(waves, out):
            solo = fe(w[None])[0]
            assert o.shape == solo.shape
            assert float((o - solo).abs().max()) <= 1e-5 * max(1.0, float(solo.abs().max()))


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2-layer"])
@pytest.mark.parametrize("pad_value", [0.0, -0.7])
def test_gemm_cnn_computes_a_constant_tail_once_and_equals_the_solo_run(tiny_models, kind, pad_value):
    """Clips padded to 1 s (the padding audit's windows: zeros, or the constant a normalised
    padded vector has): every frame whose samples are all padding is the same, so one is computed
    and repeated -- the frames still equal each window run alone (and its group norm, over the
    whole window, padding included)."""
    fe = SSLEncoder(tiny_models[kind]).model.feature_extractor
    layers = list(fe.conv_layers)
    rng = np.random.default_rng(11)
    sizes = [2400, 719, 16000, 5000]
    waves = []
    for n in sizes:
        w = np.full(16000, pad_value, np.float32)
        w[:n] = rng.normal(size=n)
        waves.append(torch.from_numpy(w))
    tails = [constant_tail(w) for w in waves]
    assert tails[0] <= 2400 and tails[1] <= 719 and tails[3] <= 5000 and tails[2] >= 15999
    _, slots, frames, computed = cnn_slots(layers, [16000] * 4, tails)
    assert frames == [49] * 4
    assert computed == [min(49, -(-t // 320) + 1) for t in tails] and computed[0] <= 9 and computed[2] == 49
    assert sum(slots) < 16000 * 2
    with torch.inference_mode():
        out, counts = gemm_cnn(fe, waves)
        assert counts == [49] * 4
        for w, o in zip(waves, out):
            solo = fe(w[None])[0]
            assert o.shape == solo.shape == (solo.shape[0], 49)
            assert float((o - solo).abs().max()) <= 1e-5 * max(1.0, float(solo.abs().max()))


def test_constant_tail():
    t = torch.tensor
    assert constant_tail(t([1.0, 2.0, 3.0])) == 2
    assert constant_tail(t([1.0, 2.0, 0.0, 0.0, 0.0])) == 2
    assert constant_tail(t([0.0, 0.0])) == 0
    assert constant_tail(t([5.0])) == 0


def test_gemm_cnn_gradients_equal_conv1d(tiny_models):
    """Fine-tuning the CNN: the same gradients as torch's Conv1d path."""
    enc = SSLEncoder(tiny_models["wavlm"])
    fe = enc.model.feature_extractor
    waves = _waves()[1:5]
    grads = []
    for fast in (True, False):
        fe.zero_grad()
        enc.cnn_gemm = fast
        loss = sum((f ** 2).sum() for f in enc.cnn_outputs(waves))
        loss.backward()
        grads.append([p.grad.clone() for p in fe.parameters()])
    for g_fast, g_ref in zip(*grads):
        assert torch.allclose(g_fast, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


@pytest.mark.parametrize("t", [1, 3, 7, 40])
def test_cropped_positional_conv_equals_the_module(tiny_models, t):
    model = SSLEncoder(tiny_models["wavlm"]).model
    pos = model.encoder.pos_conv_embed
    assert pos_conv_croppable(pos) and pos.conv.kernel_size[0] == 16
    x = torch.randn(3, t, pos.conv.in_channels)
    x[1, t // 2 + 1 :] = 0  # padding frames are zero, as the model sets them
    with torch.no_grad():
        ref = pos(x)
        got = _pos_conv_cropped(pos, x)
    assert got.shape == ref.shape == x.shape
    assert float((got - ref).abs().max()) <= 1e-5


def test_fast_wavlm_attention_equals_the_module_with_padding(tiny_models):
    model = SSLEncoder(tiny_models["wavlm"]).model
    layers = model.encoder.layers
    assert all(wavlm_attention_swappable(layer.attention) for layer in layers)
    torch.manual_seed(1)
    x = torch.randn(3, 9, model.config.hidden_size)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        ref0, _, bias_ref = layers[0].attention(x, attention_mask=mask)
        got0, _, bias_got = wavlm_attention_fast(layers[0].attention, x, attention_mask=mask)
        assert float((got0 - ref0).abs().max()) <= 1e-5
        # the next layer gets the ungated bias from the first (HF: per clip; here once)
        ref1, _, _ = layers[1].attention(x, attention_mask=mask, position_bias=bias_ref)
        got1, _, _ = wavlm_attention_fast(layers[1].attention, x, attention_mask=mask, position_bias=bias_got)
        got1b, _, _ = wavlm_attention_fast(layers[1].attention, x, attention_mask=mask, position_bias=bias_ref)
    assert float((got1 - ref1).abs().max()) <= 1e-5 and float((got1b - ref1).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", KINDS + ["data2vec-audio"])
def test_fast_encode_equals_the_hf_forward_batched_and_solo(tiny_models, kind):
    enc = SSLEncoder(tiny_models[kind])
    rng = np.random.default_rng(5)
    sizes = [4000, 4000, 4000] if kind == "data2vec-audio" else SIZES
    clips = [(0.1 * rng.normal(size=n)).astype(np.float32) for n in sizes]
    swapped = []
    with fast_transformer(enc.model):
        swapped = [m for m in enc.model.modules() if "forward" in vars(m)]
    assert not [m for m in enc.model.modules() if "forward" in vars(m)]  # restored afterwards
    assert len(swapped) == {"wavlm": 3, "data2vec-audio": 0}.get(kind, 1)  # pos conv (+ WavLM's 2 attentions)
    batched = enc.encode(clips)
    solo = [enc.encode([c])[0] for c in clips]
    with torch.inference_mode():
        hf = [enc.model(torch.from_numpy(enc.preprocess(c))[None], output_hidden_states=True).hidden_states for c in clips]
    worst_solo = max(float(np.abs(a - b).max()) for f, s in zip(batched, solo) for a, b in zip(f, s))
    worst_hf = max(float((torch.from_numpy(a) - h[0]).abs().max()) for f, hs in zip(batched, hf) for a, h in zip(f, hs))
    assert worst_solo <= 1e-4 and worst_hf <= 1e-4


@pytest.mark.parametrize("kind,mask", [("wavlm", True), ("wavlm", False), ("wav2vec2-layer", True), ("hubert", False)])
def test_fast_padded_recipe_equals_the_model_forward(tiny_models, kind, mask):
    """The padding audit's padded pipeline through the fast paths equals the model's own forward on
    the padded batch (with and without the recipe's attention mask)."""
    enc = SSLEncoder(tiny_models[kind])
    enc.recipe.return_attention_mask = mask
    rng = np.random.default_rng(2)
    clips = [(0.1 * rng.normal(size=n)).astype(np.float32) for n in (1300, 2100, 400, 5000)]
    ref = enc.common_pipeline(clips, pad_seconds=0.25)
    got = enc.common_pipeline(clips, pad_seconds=0.25, fast=True)
    assert [len(g[0]) for g in got] == [len(r[0]) for r in ref] == [3, 6, 1, 12]
    assert max(float(np.abs(a - b).max()) for g, r in zip(got, ref) for a, b in zip(g, r)) <= 1e-4
    # and the padding moves the frames by far more than that (what the audit measures)
    solo = [enc.encode([c])[0] for c in clips]
    assert max(float(np.abs(a - b[: len(a)]).max()) for g, s in zip(got, solo) for a, b in zip(g, s)) > 1e-2



@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                           max_target_positions=16, max_source_positions=1500, num_mel_bins=80, pad_token_id=1,
                           bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    model = WhisperModel(config)
    with torch.no_grad():  # weights large enough that attention over the window matters
        for p in model.encoder.layers.parameters():
            p.mul_(20.0)
    d = tmp_path_factory.mktemp("whisper") / "tiny"
    model.save_pretrained(d)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(d)
    return d


@pytest.mark.parametrize("context", [None, 1.0])
def test_fast_whisper_layers_equal_the_hf_encoder(tiny_whisper, context):
    from featstore.encoders.registry import load_encoder
    from featstore.encoders.whisper import _fast_layer_ok

    enc = load_encoder(str(tiny_whisper), device="cpu", context_seconds=context)
    assert enc.fast_layers and all(_fast_layer_ok(layer) for layer in enc.encoder.layers)
    rng = np.random.default_rng(4)
    clips = [(0.2 * rng.normal(size=n)).astype(np.float32) for n in (2400, 321, 8000)]
    fast = enc.encode(clips)
    solo = enc.encode(clips[1:2])[0]
    enc.fast_layers = False
    ref = enc.encode(clips)
    assert [len(f[0]) for f in fast] == [len(r[0]) for r in ref] == [8, 2, 25]
    assert max(float(np.abs(a - b).max()) for f, r in zip(fast, ref) for a, b in zip(f, r)) <= 1e-4
    assert max(float(np.abs(a - b).max()) for a, b in zip(fast[1], solo)) <= 1e-4
    # the reference is the Hugging Face encoder's own output
    if context is None:
        with torch.inference_mode():
            hf = enc.encoder(enc.log_mel(clips[:1]), output_hidden_states=True).hidden_states
        assert max(float((torch.from_numpy(a) - h[0, :8]).abs().max()) for a, h in zip(fast[0], hf)) <= 1e-4


def test_extraction_records_where_the_time_went(tiny_models, clip_set, tmp_path):
    import time

    import featstore
    from featstore.extract import extract

    before = time.time()
    res = extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "s.h5", progress=False, device="cpu")
    tim = featstore.open(res.path).attrs["extraction_stats"]["timings"]
    assert before <= tim["first_batch_unix"] <= time.time()
    assert 0 < tim["first_batch_after_start"] < res.wall_seconds
    assert 0 < tim["cnn"] + tim["transformer"] <= tim["encode"] <= tim["batch_loop"] < res.wall_seconds
    assert tim["write"] > 0 and tim["decode_wait"] >= 0 and tim["audit"] > 0
    assert res.timings["finalize"] > 0


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2"])
def test_a_cpu_batch_runs_as_single_thread_lanes_with_each_clips_solo_frames(tiny_models, kind, monkeypatch):
    """With 2 torch threads a float32 CPU batch is split into 2 lanes of equal samples that run at
    once on worker threads, one torch thread each; every clip's frames equal its solo run, the
    stats count the batch once, and the caller's thread count is restored."""
    import threading

    enc = SSLEncoder(tiny_models[kind])
    enc.lane_min_seconds = 0.1
    rng = np.random.default_rng(11)
    clips = [(0.1 * rng.normal(size=n)).astype(np.float32) for n in sorted(SIZES * 2)]
    seen = []
    inner = enc._packed
    # the lanes must run at once: each waits here for the other (a tiny model's lane can end
    # before the next is submitted, and the pool would then run both on one thread, one by one)
    together = threading.Barrier(2, timeout=30)

    def spy(waves, *a, **k):
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(waves)))
        if threading.current_thread().name.startswith("featstore-lane"):
            together.wait()
        return inner(waves, *a, **k)

    monkeypatch.setattr(enc, "_packed", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = dict(enc.stats)
        batched = enc.encode(clips)
        lanes = list(seen)
        assert torch.get_num_threads() == 2
        assert enc.stats["batches"] == before["batches"] + 1
        assert enc.stats["frames"] - before["frames"] == sum(enc.num_frames(len(c)) for c in clips)
        torch.set_num_threads(1)  # one thread: one lane, in the caller's thread
        seen.clear()
        solo = [enc.encode([c])[0] for c in clips]
        assert all(name == threading.current_thread().name for name, _, _ in seen)
    finally:
        torch.set_num_threads(threads)
    assert len(lanes) == 2 and len({name for name, _, _ in lanes}) == 2
    assert all(name.startswith("featstore-lane") and n == 1 for name, n, _ in lanes)
    assert sorted(k for _, _, k in lanes) == [len(clips) // 2] * 2  # the sizes come in pairs
    assert [len(f) for f in batched] == [len(s) for s in solo]
    worst = max(float(np.abs(a - b).max()) for f, s in zip(batched, solo) for a, b in zip(f, s))
    assert [a.shape for f in batched for a in f] == [b.shape for s in solo for b in s]
    assert worst <= 1e-4


def test_lanes_split_a_batch_by_samples_and_fall_back_to_one_call_when_they_cannot_balance(tiny_models):
    """The lanes get equal shares of the samples, not of the clips (a clip as long as two others
    gets a lane to itself); a batch no split can balance within ``lane_imbalance`` runs as one
    call; so does a batch under ``lane_min_seconds`` per lane, a one-thread run, and ``cpu_lanes=1``."""
    enc = SSLEncoder(tiny_models["wavlm"])
    enc.lane_min_seconds = 0.1
    waves = lambda *n: [torch.zeros(k) for k in n]  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert enc._lane_parts(waves(4000, 4000, 8000)) == [[2], [0, 1]]
        assert sorted(map(len, enc._lane_parts(waves(3000, 3000, 3000, 3000)))) == [2, 2]
        assert enc._lane_parts(waves(4000, 4000, 4000)) == [[0, 1, 2]]  # 2:1 is 33 % above an equal share
        enc.lane_imbalance = 0.40
        assert sorted(map(len, enc._lane_parts(waves(4000, 4000, 4000)))) == [1, 2]
        enc.lane_imbalance = 0.10
        assert enc._lane_parts(waves(1000, 1000)) == [[0, 1]]  # 0.0625 s per lane < 0.1 s
        enc.cpu_lanes = 1
        assert enc._lane_parts(waves(4000, 4000, 8000)) == [[0, 1, 2]]
        enc.cpu_lanes = None
        torch.set_num_threads(1)
        assert enc._lane_parts(waves(4000, 4000, 8000)) == [[0, 1, 2]]
    finally:
        torch.set_num_threads(threads)


def test_a_failing_lane_is_raised_only_after_every_lane_has_finished(tiny_models, monkeypatch):
    """An error in one lane reaches the caller after the other lanes are done (a caller that
    retries, e.g. with a smaller batch, never runs beside a lane still encoding), and the caller's
    thread count is restored."""
    import threading
    import time as _time

    enc = SSLEncoder(tiny_models["wavlm"])
    enc.lane_min_seconds = 0.1
    clips = [np.zeros(n, np.float32) for n in (8000, 4000, 4000)]
    finished = threading.Event()

    def spy(waves, *a, **k):
        if max(len(w) for w in waves) == 8000:  # the first lane (longest clip first)
            raise RuntimeError("lane failed")
        _time.sleep(0.5)
        finished.set()
        return []

    monkeypatch.setattr(enc, "_packed", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="lane failed"):
            enc.encode(clips)
        assert finished.is_set()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_batches_with_different_lane_counts_share_one_pool_and_keep_no_dead_threads_buffers(tiny_models):
    """Batches split into 2, then 3, then 2 lanes leave at most 3 lane threads alive (not a pool per
    lane count), and the model keeps scratch buffers only for threads that are alive."""
    import threading

    enc = SSLEncoder(tiny_models["wavlm"])
    enc.lane_min_seconds = 0.1
    clips = [(0.1 * np.random.default_rng(k).normal(size=4000)).astype(np.float32) for k in range(6)]
    for lanes in (2, 3, 2, 3):
        enc.cpu_lanes = lanes
        enc.encode(clips)
    lane_threads = lambda: [t for t in threading.enumerate() if t.name.startswith("featstore-lane")]  # noqa: E731
    assert len(lane_threads()) <= 3
    enc.cpu_lanes = 3
    enc.encode(clips)
    pools = [m.__dict__["_featstore_scratch"] for m in enc._net.modules() if "_featstore_scratch" in m.__dict__]
    assert pools
    live = {t.ident for t in threading.enumerate()}
    assert all(set(p) <= live for p in pools)


def test_the_weights_hash_starts_before_the_device_is_picked(tiny_models, monkeypatch):
    """The content hash of a model directory runs in a thread beside the rest of loading; it must
    start before ``device="auto"`` imports torch (~1 s of a cold start), not after."""
    from pathlib import Path

    from featstore.encoders import registry

    order = []
    real_resolve, real_pick = registry.resolve_pretrained, registry.pick_device
    monkeypatch.setattr(registry, "resolve_pretrained", lambda *a, **k: (order.append("hash"), real_resolve(*a, **k))[1])
    monkeypatch.setattr(registry, "pick_device", lambda d: (order.append("device"), real_pick(d))[1])
    enc = registry.load_encoder(tiny_models["wavlm"], device="auto")
    assert order == ["hash", "device"]
    assert enc.revision == "sha256:" + registry.content_hash(Path(tiny_models["wavlm"]))

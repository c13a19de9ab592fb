"""Controls at extraction: the common padded recipe as a measured store (``--emulate-padding``,
``--keep-padding``) and a seeded random-init control (``--random-init``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import featstore
from featstore.extract import extract
from featstore.store import StoreMismatch, check_store
from featstore_cli.featstore_app import app
from probes.names import store_label
from tests.conftest import save_tiny, write_manifest, write_wav

PAD = 0.5  # seconds: every test clip (0.08-0.25 s) is padded, none is cut
runner = CliRunner()


@pytest.fixture(scope="module")
def gn_models(tmp_path_factory):
    """Tiny group-norm wav2vec2 (``feat_extract_norm="group"``), with the preprocessing of
    wav2vec2-base (normalise, no attention mask) and with an attention mask."""
    from transformers import Wav2Vec2FeatureExtractor

    root = tmp_path_factory.mktemp("gn")
    out = {}
    for mask in (False, True):
        d = save_tiny("wav2vec2", root / f"mask{int(mask)}", feat_extract_norm="group")
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=mask).save_pretrained(d)
        out[mask] = d
    return out


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(123)  # not seed 0: --random-init 0 would rebuild these very weights
    config = WhisperConfig(d_model=24, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64,
                           max_target_positions=16, max_source_positions=1500, num_mel_bins=80, pad_token_id=1,
                           bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    path = tmp_path_factory.mktemp("tiny-whisper")
    WhisperModel(config).save_pretrained(path)
    WhisperFeatureExtractor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clips6(tmp_path_factory):
    """6 short clips (0.08-0.25 s), 3 labels, 3 speakers (module-scoped: extracted once per test file)."""
    root = tmp_path_factory.mktemp("clips6")
    rng = np.random.default_rng(2)
    rows = []
    for i in range(6):
        n = int(rng.integers(1280, 4000))
        p = write_wav(root / "wav" / f"c{i}.wav", (0.1 * rng.normal(size=n)).astype(np.float32))
        rows.append({"path": f"wav/{p.name}", "label": "abc"[i % 3], "speaker": f"s{i % 3}"})
    return write_manifest(root / "clips.csv", rows)


@pytest.fixture(scope="module")
def gn_stores(gn_models, clips6, tmp_path_factory):
    """Exact, padded (true frames) and padded (padding kept) stores of the no-mask group-norm model."""
    root = tmp_path_factory.mktemp("gn-stores")
    model = str(gn_models[False])
    out = {"exact": root / "exact.h5", "padded": root / "padded.h5", "kept": root / "kept.h5"}
    extract(clips6, model, out["exact"], progress=False, audit_clips=0)
    extract(clips6, model, out["padded"], emulate_padding=PAD, progress=False, audit_clips=0)
    extract(clips6, model, out["kept"], emulate_padding=PAD, keep_padding=True, progress=False, audit_clips=0)
    return out


def _clips(manifest):
    rows = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    return [sf.read(str(manifest.parent / p), dtype="float32")[0] for p in rows]


def _hf_padded_forward(model_dir, clips, pad_seconds):
    """The recipe written out by hand: zero-pad every clip to ``pad_seconds``, normalise as the
    checkpoint's feature extractor says (over the clip's own samples when it returns a mask, over
    the padded vector otherwise), then the model's forward on the batch (mask only when returned)."""
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    n = int(pad_seconds * 16000)
    x = np.zeros((len(clips), n), np.float32)
    mask = np.zeros((len(clips), n), np.int64)
    for i, c in enumerate(clips):
        c = c[:n].astype(np.float64)
        if fe.return_attention_mask:
            x[i, : len(c)] = (c - c.mean()) / np.sqrt(c.var() + 1e-7)
        else:
            v = np.zeros(n)
            v[: len(c)] = c
            x[i] = (v - v.mean()) / np.sqrt(v.var() + 1e-7)
        mask[i, : len(c)] = 1
    kwargs = {"attention_mask": torch.from_numpy(mask)} if fe.return_attention_mask else {}
    with torch.no_grad():
        hs = model(torch.from_numpy(x), output_hidden_states=True, **kwargs).hidden_states
    return [h.numpy() for h in hs]


def _all_frames(path):
    with featstore.open(path) as s:
        return [[s.frames(i, k) for k in s.layer_ids] for i in range(s.num_items)]


def _compare(padded, exact, ref, n_items):
    worst_ref, worst_exact = 0.0, 0.0
    with featstore.open(padded) as p, featstore.open(exact) as e:
        assert (p.items["num_frames"] == e.items["num_frames"]).all()  # true frames only
        for i in range(n_items):
            t = int(p.items["num_frames"][i])
            for k in p.layer_ids:
                worst_ref = max(worst_ref, float(np.abs(p.frames(i, k) - ref[k][i, :t]).max()))
                worst_exact = max(worst_exact, float(np.abs(p.frames(i, k) - e.frames(i, k)).max()))
    return worst_ref, worst_exact


def test_emulate_padding_equals_hf_forward_of_padded_batch_and_differs_from_exact(gn_models, gn_stores, clips6):
    ref = _hf_padded_forward(gn_models[False], _clips(clips6), PAD)
    worst_ref, worst_exact = _compare(gn_stores["padded"], gn_stores["exact"], ref, 6)
    assert worst_ref < 1e-5
    assert worst_exact > 1e-2  # group norm (and the normalisation) over the padded signal moves every frame
    with featstore.open(gn_stores["padded"]) as p, featstore.open(gn_stores["exact"]) as e:
        assert p.attrs["padding_exact"] is False or p.attrs["padding_exact"] == 0
        assert bool(e.attrs["padding_exact"]) is True
        raw = p.h5.attrs["padding_recipe"]
        assert json.loads(raw) == {"pad_seconds": PAD, "keep_padding": False, "attention_mask": False, "truncated": 0}
        assert json.loads(p.h5.attrs["padding_emulation"]) == {"pad_seconds": PAD, "keep_padding": False,
                                                              "attention_mask": False}
    assert store_label("p", {"padding_exact": False, "padding_recipe": raw}) == "p [padded to 0.5 s]"


def test_emulate_padding_with_the_checkpoints_attention_mask(gn_models, clips6, tmp_path):
    model = str(gn_models[True])
    extract(clips6, model, tmp_path / "e.h5", progress=False, audit_clips=0)
    extract(clips6, model, tmp_path / "p.h5", emulate_padding=PAD, progress=False, audit_clips=0)
    worst_ref, worst_exact = _compare(tmp_path / "p.h5", tmp_path / "e.h5",
                                      _hf_padded_forward(gn_models[True], _clips(clips6), PAD), 6)
    assert worst_ref < 1e-5
    assert worst_exact > 1e-2  # the mask does not stop group norm from seeing the padding
    with featstore.open(tmp_path / "p.h5") as p:
        assert p.attrs["padding_recipe"]["attention_mask"] is True


def test_keep_padding_stores_the_padded_length_and_readers_cope(gn_models, gn_stores, clips6):
    out = gn_stores["kept"]
    ref = _hf_padded_forward(gn_models[False], _clips(clips6), PAD)
    full = ref[0].shape[1]
    assert full == 24  # frames of 0.5 s at this CNN's stride
    assert check_store(out) == []
    with featstore.open(out) as s:
        items = s.items
        assert (items["num_frames"] == full).all()
        assert (items["num_samples"] < PAD * 16000).all() and items["num_samples"].nunique() > 1  # true lengths
        recipe = s.attrs["padding_recipe"]
        assert recipe["keep_padding"] is True and recipe["frames_per_item"] == full
        for i in range(6):
            np.testing.assert_allclose(s.frames(i, 2), ref[2][i], atol=1e-5)
        from probes.pooling import pooled_matrix

        pooled = pooled_matrix(s, 2, "mean", scope="clip", cache=False)
    np.testing.assert_allclose(pooled, ref[2].mean(axis=1), atol=1e-5)  # the mean over the padding too
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "padded to 0.5 s, padding kept" in r.output


def test_identity_refuses_padded_for_exact_and_other_padding(gn_models, gn_stores, clips6):
    model = str(gn_models[False])
    exact, padded = gn_stores["exact"], gn_stores["padded"]
    with pytest.raises(StoreMismatch, match="padding_exact"):
        extract(clips6, model, exact, emulate_padding=PAD, progress=False, audit_clips=0)
    with pytest.raises(StoreMismatch, match="padding_exact"):
        extract(clips6, model, padded, progress=False, audit_clips=0)
    with pytest.raises(StoreMismatch, match="padding_emulation"):
        extract(clips6, model, padded, emulate_padding=0.6, progress=False, audit_clips=0)
    with pytest.raises(StoreMismatch, match="padding_emulation"):
        extract(clips6, model, padded, emulate_padding=PAD, keep_padding=True, progress=False, audit_clips=0)
    assert extract(clips6, model, padded, emulate_padding=PAD, progress=False, audit_clips=0).already_done
    assert extract(clips6, model, exact, progress=False, audit_clips=0).already_done


def test_padded_batch_is_chunked_and_chunks_do_not_change_frames(gn_models, gn_stores, clips6, tmp_path):
    from featstore.encoders.registry import load_encoder
    from featstore.extract import PaddedRecipe, padding_settings

    enc = load_encoder(str(gn_models[False]), device="cpu")
    settings = padding_settings(enc, PAD, False)
    sizes = []
    real = enc.padded_pipeline
    enc.padded_pipeline = lambda clips, *a: sizes.append(len(clips)) or real(clips, *a)
    clips = _clips(clips6)
    chunked = PaddedRecipe(enc, settings, batch_seconds=1.0).encode(clips)  # 2 clips of 0.5 s per call
    assert sizes == [2, 2, 2]
    whole = real(clips, PAD, False)
    for x, y in zip(chunked, whole):
        for u, v in zip(x, y):
            np.testing.assert_allclose(u, v, atol=1e-5)


def test_recipe_cuts_long_clips_and_counts_them(gn_models, clips6, tmp_path):
    model = str(gn_models[True])
    res = extract(clips6, model, tmp_path / "cut.h5", emulate_padding=0.15, progress=False, audit_clips=0)
    with featstore.open(res.path) as s:
        n = s.items["num_samples"].to_numpy()
        recipe = s.attrs["padding_recipe"]
        enc_frames = s.items["num_frames"].to_numpy()
    assert recipe["truncated"] == int((n > 2400).sum()) > 0
    from featstore.encoders.registry import load_encoder

    enc = load_encoder(model, device="cpu")
    assert list(enc_frames) == [enc.num_frames(min(int(k), 2400)) for k in n]


def test_whisper_recipe_equals_hf_on_the_padded_clip(tiny_whisper, clips6, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperModel

    exact = extract(clips6, str(tiny_whisper), tmp_path / "e.h5", progress=False, audit_clips=0)
    kept = extract(clips6, str(tiny_whisper), tmp_path / "k.h5", emulate_padding=1.0, keep_padding=True,
                   progress=False, audit_clips=0)
    cut = extract(clips6, str(tiny_whisper), tmp_path / "c.h5", emulate_padding=1.0, progress=False, audit_clips=0)
    clips = _clips(clips6)
    fe = WhisperFeatureExtractor.from_pretrained(tiny_whisper)
    enc = WhisperModel.from_pretrained(tiny_whisper).get_encoder().eval()
    padded = [np.pad(c, (0, 16000 - len(c))) for c in clips]
    with torch.no_grad():
        hs = enc(fe(padded, sampling_rate=16000, return_tensors="pt").input_features, output_hidden_states=True).hidden_states
    with featstore.open(kept.path) as k, featstore.open(cut.path) as c, featstore.open(exact.path) as e:
        assert (k.items["num_frames"] == 50).all()
        assert json.loads(k.h5.attrs["padding_recipe"])["attention_mask"] is False
        for i in range(6):
            for layer in (0, 2):
                np.testing.assert_allclose(k.frames(i, layer), hs[layer][i, :50].numpy(), atol=1e-5)
                # within Whisper's own 30-s window, padding to 1 s changes no true frame
                np.testing.assert_allclose(c.frames(i, layer), e.frames(i, layer), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit this Whisper window|longer than this encoder's window"):
        extract(clips6, str(tiny_whisper), tmp_path / "x.h5", emulate_padding=31, progress=False, audit_clips=0)


def test_frontend_recipe_true_frames_are_exact_and_kept_padding_is_floor(clips6, tmp_path):
    e = extract(clips6, "logmel", tmp_path / "e.h5", progress=False)
    k = extract(clips6, "logmel", tmp_path / "k.h5", emulate_padding=PAD, keep_padding=True, progress=False)
    c = extract(clips6, "logmel", tmp_path / "c.h5", emulate_padding=PAD, progress=False)
    with featstore.open(e.path) as se, featstore.open(k.path) as sk, featstore.open(c.path) as sc:
        assert (sk.items["num_frames"] == (8000 - 400) // 160 + 1).all()
        for i in range(6):
            t = int(se.items["num_frames"][i])
            np.testing.assert_array_equal(sc.frames(i, 0), se.frames(i, 0))  # frames are local
            np.testing.assert_array_equal(sk.frames(i, 0)[:t], se.frames(i, 0))
            assert np.allclose(sk.frames(i, 0)[-1], np.log(1e-10))  # a frame of padding only


def test_random_init_reproducible_marked_and_not_the_trained_weights(gn_models, gn_stores, clips6, tmp_path):
    model = str(gn_models[False])
    a = extract(clips6, model, tmp_path / "a.h5", random_init=1, progress=False, audit_clips=0)
    b = extract(clips6, model, tmp_path / "b.h5", random_init=1, progress=False, audit_clips=0)
    c = extract(clips6, model, tmp_path / "c.h5", random_init=2, progress=False, audit_clips=0)
    fa, fb, fc, ft = (_all_frames(p) for p in (a.path, b.path, c.path, gn_stores["exact"]))
    for x, y in zip(fa, fb):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)  # bit-identical from the same seed
    last = len(fa[0]) - 1
    assert min(np.abs(x[last] - y[last]).max() for x, y in zip(fa, fc)) > 1e-3
    assert min(np.abs(x[last] - y[last]).max() for x, y in zip(fa, ft)) > 1e-3
    with featstore.open(a.path) as sa, featstore.open(b.path) as sb, featstore.open(gn_stores["exact"]) as st:
        attrs = sa.attrs
        assert attrs["control"] == "random-init" and attrs["random_init_seed"] == 1
        assert attrs["encoder_revision"] == "random-init:1"
        assert attrs["random_init_source_revision"] == st.attrs["encoder_revision"]
        assert "control" not in st.attrs
        same = {k: v for k, v in attrs.items() if k not in ("created_at", "extraction_stats")}
        assert same == {k: v for k, v in sb.attrs.items() if k not in ("created_at", "extraction_stats")}
        assert store_label("a", attrs) == "a [random-init control]"
    with pytest.raises(StoreMismatch, match="encoder_revision"):
        extract(clips6, model, gn_stores["exact"], random_init=1, progress=False, audit_clips=0)
    with pytest.raises(StoreMismatch, match="random_init_seed|encoder_revision"):
        extract(clips6, model, tmp_path / "a.h5", random_init=2, progress=False, audit_clips=0)


def test_random_init_whisper_and_frontend_error(tiny_whisper, clips6, tmp_path):
    from transformers import WhisperModel

    a = extract(clips6, str(tiny_whisper), tmp_path / "a.h5", random_init=0, progress=False, audit_clips=0)
    b = extract(clips6, str(tiny_whisper), tmp_path / "b.h5", random_init=0, progress=False, audit_clips=0)
    for x, y in zip(_all_frames(a.path), _all_frames(b.path)):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    from featstore.encoders.registry import load_encoder

    enc = load_encoder(str(tiny_whisper), device="cpu", random_init=0)
    trained = WhisperModel.from_pretrained(tiny_whisper).get_encoder().state_dict()
    fresh = enc.encoder.state_dict()
    assert fresh.keys() == trained.keys()
    assert not torch.equal(fresh["layers.0.fc1.weight"], trained["layers.0.fc1.weight"])
    with featstore.open(a.path) as s:
        assert s.attrs["control"] == "random-init" and s.attrs["encoder_revision"] == "random-init:0"
    with pytest.raises(ValueError, match="front end 'logmel' has none"):
        extract(clips6, "logmel", tmp_path / "f.h5", random_init=0, progress=False)


def test_default_names_keep_controls_apart(gn_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = str(gn_models[False])
    clip = write_wav(tmp_path / "wav" / "a.wav", (0.1 * np.random.default_rng(0).normal(size=2000)).astype(np.float32))
    manifest = write_manifest(tmp_path / "clips.csv", [{"path": str(clip), "label": "a", "speaker": "s"}])
    names = {extract(manifest, model, progress=False, audit_clips=0, **kw).path.name
             for kw in ({}, {"random_init": 0}, {"emulate_padding": 1.0}, {"emulate_padding": 1.0, "keep_padding": True})}
    assert names == {"mask0__clips.h5", "mask0__clips.random-init0.h5", "mask0__clips.padded1s.h5",
                     "mask0__clips.padded1s-kept.h5"}


def test_cli_flags_and_bad_values(gn_models, clips6, tmp_path):
    model = str(gn_models[False])
    base = ["extract", "--manifest", str(clips6), "--model", model]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "p.h5"), "--emulate-padding", "0.5", "--keep-padding"])
    assert r.exit_code == 0, r.output
    with featstore.open(tmp_path / "p.h5") as s:
        assert s.attrs["padding_recipe"]["keep_padding"] is True and (s.items["num_frames"] == 24).all()
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "r.h5"), "--random-init", "3"])
    assert r.exit_code == 0, r.output
    with featstore.open(tmp_path / "r.h5") as s:
        assert s.attrs["random_init_seed"] == 3
    bad = [
        (["--emulate-padding", "-1"], "--emulate-padding must be a positive number of seconds, got -1.0"),
        (["--emulate-padding", "0"], "--emulate-padding must be a positive number of seconds"),
        (["--keep-padding"], "--keep-padding needs --emulate-padding SECONDS"),
        (["--random-init", "-1"], "--random-init must be a whole number >= 0"),
    ]
    for args, message in bad:
        r = runner.invoke(app, [*base, "--out", str(tmp_path / "bad.h5"), *args])
        assert r.exit_code == 2, (args, r.output)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, r.output)
    r = runner.invoke(app, ["extract", "--manifest", str(clips6), "--model", "logmel", "--random-init", "0",
                            "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 2 and "front end 'logmel' has none" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad.h5").exists()


def test_info_on_a_whisper_context_store_quotes_its_window_audit(tiny_whisper, clips6, tmp_path):
    # the Whisper audit compares the context window with the full one; it has no pad_seconds
    out = tmp_path / "ctx.h5"
    extract(clips6, str(tiny_whisper), out, encoder_options={"context_seconds": 1.0}, progress=False, audit_clips=2)
    with featstore.open(out) as s:
        assert s.attrs["padding_audit"]["reference"] == "full-30s"
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())  # the table wraps long cells
    assert "the 1 s context window moves frames by up to" in text and "(vs the full 30-s window)" in text


def test_merge_refuses_padded_with_exact_shards_and_sums_truncated(clips6, tmp_path):
    from featstore.merge import MergeError, merge_shards

    pad = 0.15  # cuts the clips longer than 2,400 samples
    padded = [extract(clips6, "logmel", tmp_path / f"p{k}.h5", emulate_padding=pad, shard=f"{k}/2", progress=False).path
              for k in (1, 2)]
    exact2 = extract(clips6, "logmel", tmp_path / "e2.h5", shard="2/2", progress=False).path
    with pytest.raises(MergeError, match="padding"):
        merge_shards([padded[0], exact2], tmp_path / "mixed.h5")
    single = extract(clips6, "logmel", tmp_path / "single.h5", emulate_padding=pad, progress=False).path
    merged = merge_shards(padded, tmp_path / "merged.h5")
    with featstore.open(merged) as m, featstore.open(single) as s:
        assert m.attrs["padding_recipe"] == s.attrs["padding_recipe"]
        assert m.attrs["padding_recipe"]["truncated"] > 0
    control = [extract(clips6, "logmel", tmp_path / f"c{k}.h5", shard=f"{k}/2", progress=False).path for k in (1, 2)]
    import h5py

    with h5py.File(control[1], "r+") as h:  # a shard of a (random-init) control beside a trained shard
        h.attrs["control"], h.attrs["random_init_seed"] = "random-init", 0
    with pytest.raises(MergeError, match="control"):
        merge_shards(control, tmp_path / "mixed2.h5")


@pytest.mark.parametrize("mask", [False, True])
def test_padding_audit_models_the_recipe_the_store_writes(gn_models, clips6, mask):
    """The audit's padded frames (fast and reference paths) are the --emulate-padding recipe's: on a
    normalising checkpoint without an attention mask the recipe normalises the padded vector."""
    from featstore.encoders.registry import load_encoder

    enc = load_encoder(str(gn_models[mask]), device="cpu")
    clips = _clips(clips6)
    recipe = enc.padded_pipeline(clips, PAD)
    for fast in (False, True):
        audit = enc.common_pipeline(clips, PAD, fast=fast)
        err = max(float(np.abs(a[k] - r[k]).max()) for a, r in zip(audit, recipe) for k in range(len(r)))
        assert err < 1e-4, (fast, err)

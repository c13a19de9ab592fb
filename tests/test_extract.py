"""Extraction end to end on tiny models: frame counts, padding-exactness, resume, bad input."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

import featstore
from featstore.encoders.hf_ssl import SSLEncoder
from featstore.extract import extract, parse_layers, plan_batches, segment_frames
from featstore.store import StoreWriter, partial_path
from tests.conftest import write_manifest, write_wav


def conv_formula(n: int) -> int:
    return 0 if n < 400 else (n - 400) // 320 + 1


def solo_hidden_states(model_dir, clip: np.ndarray) -> list[np.ndarray]:
    """What the Hugging Face model returns for the clip alone (after its own normalisation)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    x = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
    with torch.no_grad():
        out = model(torch.from_numpy(x.astype(np.float32))[None], output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("n", [399, 400, 719, 720, 1039, 1040, 2400, 16000])
def test_num_frames_matches_conv_formula(tiny_models, n):
    enc = SSLEncoder(tiny_models["wavlm"])
    assert enc.num_frames(n) == conv_formula(n)
    assert enc.receptive_field_samples == 400 and enc.frame_stride_samples == 320
    assert enc.first_frame_center_samples == 199.5


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2", "wav2vec2-layer", "hubert", "data2vec-audio"])
def test_batched_equals_solo(tiny_models, clip_set, tmp_path, kind):
    res = extract(clip_set, str(tiny_models[kind]), tmp_path / f"{kind}.h5", batch_seconds=1.0, progress=False)
    assert res.ok == 12 and not res.failures
    with featstore.open(res.path) as store:
        assert store.num_layers == 3
        items = store.items
        worst = 0.0
        for i, row in items.iterrows():
            x, sr = sf.read(row["path"], dtype="float32")
            assert row["num_frames"] == conv_formula(len(x))
            ref = solo_hidden_states(tiny_models[kind], x)
            for k in range(3):
                got = store.frames(i, k)
                assert got.shape == ref[k].shape
                worst = max(worst, float(np.abs(got - ref[k]).max()))
    assert worst <= 1e-4
    assert featstore.check_store(res.path) == []


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2", "hubert"])
def test_masked_group_norm_cnn_equals_each_clip_alone(tiny_models, kind):
    from featstore.encoders.hf_ssl import group_norm_batchable, masked_group_norm_cnn

    enc = SSLEncoder(tiny_models[kind])
    fe = enc.model.feature_extractor
    assert enc.group_norm_cnn and group_norm_batchable(fe) and not enc.cnn_per_clip
    assert enc.extra_attrs["cnn_mode"] == "batched, masked group norm"
    rng = np.random.default_rng(3)
    sizes = [16000, 400, 719, 1040, 4000]  # one batch, up to 40x padding
    waves = [torch.from_numpy(rng.normal(size=n).astype(np.float32)) for n in sizes]
    with torch.no_grad():
        out, counts = masked_group_norm_cnn(fe, waves)
        assert counts == [conv_formula(n) for n in sizes] == [49, 1, 1, 3, 12]
        assert out.shape == (5, fe.conv_layers[-1].conv.out_channels, 49)
        for i, w in enumerate(waves):
            solo = fe(w[None])[0]
            assert solo.shape[-1] == counts[i]
            assert torch.allclose(out[i, :, : counts[i]], solo, atol=1e-5, rtol=1e-5)
            assert torch.count_nonzero(out[i, :, counts[i] :]) == 0
        # the plain batched CNN (what a padded pipeline runs) is far off for the short clips
        naive = fe(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True))
        assert (naive[1, :, :1] - fe(waves[1][None])[0]).abs().max() > 0.1


def test_layer_norm_cnn_is_batched_plainly(tiny_models):
    enc = SSLEncoder(tiny_models["wav2vec2-layer"])
    assert not enc.group_norm_cnn and not enc.cnn_per_clip
    assert enc.extra_attrs["cnn_mode"] == "batched"


def test_padding_audit_shows_group_norm_damage(tiny_models, clip_set, tmp_path):
    group = extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "g.h5", progress=False)
    layer = extract(clip_set, str(tiny_models["wav2vec2-layer"]), tmp_path / "l.h5", progress=False)
    audit_g = featstore.open(group.path).attrs["padding_audit"]
    audit_l = featstore.open(layer.path).attrs["padding_audit"]
    assert audit_g["clips"] == 8 and audit_g["pad_seconds"] == 1.0 and len(audit_g["max_abs"]) == 3
    assert min(audit_g["max_abs"]) > 0.1  # zero padding moves every layer of a group-norm model
    assert max(audit_l["max_abs"]) < 1e-4  # a layer-norm model with a mask is unaffected


@pytest.mark.parametrize("layers, dtype, reused", [("all", "float32", True), ("0,2", "float32", False),
                                                   ("all", "float16", False)])
def test_padding_audit_reads_the_clips_frames_back_from_the_run(tiny_models, clip_set, tmp_path, monkeypatch,
                                                                layers, dtype, reused):
    """The audit's padding-exact side is the run's own frames (not encoded a second time) when the
    store holds them as the encoder returns them; its numbers are those of re-encoding."""
    encoded = []
    real = SSLEncoder.encode
    monkeypatch.setattr(SSLEncoder, "encode", lambda self, clips: encoded.append(len(clips)) or real(self, clips))
    res = extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "s.h5", layers=layers, dtype=dtype, progress=False)
    assert res.ok == 12
    assert sum(encoded) == (12 if reused else 12 + 8)  # 12 clips once; re-encoding adds the 8 audit clips
    audit = featstore.open(res.path).attrs["padding_audit"]
    enc = SSLEncoder(tiny_models["wavlm"])
    with featstore.open(res.path) as st:
        clips = [sf.read(p, dtype="float32")[0] for p in st.column("path")[:8]]
    want = enc.padding_audit(clips)
    assert audit["clips"] == want["clips"] == 8
    np.testing.assert_allclose(audit["max_abs"], want["max_abs"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(audit["mean_abs"], want["mean_abs"], rtol=1e-4, atol=1e-6)


def test_batches_have_little_padding(tiny_models, tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(60):
        n = int(rng.integers(1280, 4000))
        write_wav(tmp_path / f"w{i}.wav", (0.1 * rng.normal(size=n)).astype(np.float32))
        rows.append({"path": f"w{i}.wav", "label": "ab"[i % 2]})
    man = write_manifest(tmp_path / "m.csv", rows)
    res = extract(man, str(tiny_models["wavlm"]), tmp_path / "s.h5", batch_seconds=4.0, progress=False)
    assert res.ok == 60
    assert res.padded_fraction < 0.05


def test_plan_batches_sorted_and_budgeted():
    lengths = [4000, 1000, 3000, 2000, 1000]
    batches = plan_batches(lengths, batch_seconds=6000 / 16000, sample_rate=16000)
    assert batches == [[1, 4, 3], [2], [0]]  # sorted by length; 3 * 2000 <= 6000 < 2 * 3000
    # with frame counts, a batch is cut where padding would pass 5 % of its frames
    frames_of = lambda n: n // 1000  # noqa: E731
    lengths = [1000] * 10 + [2000] + [3000] * 3
    batches = plan_batches(lengths, batch_seconds=100, sample_rate=16000, frames_of=frames_of)
    assert batches == [list(range(10)), [10], [11, 12, 13]]


def test_resume_after_interruption_equals_uninterrupted(tiny_models, clip_set, tmp_path):
    model = str(tiny_models["wavlm"])
    full = extract(clip_set, model, tmp_path / "full.h5", batch_seconds=0.3, progress=False)
    out = tmp_path / "resumed.h5"

    def stop_after_two(i):
        if i == 1:
            raise KeyboardInterrupt

    first = extract(clip_set, model, out, batch_seconds=0.3, progress=False, on_batch=stop_after_two)
    assert first.interrupted
    assert not out.exists() and partial_path(out).exists()  # never half-written under the final name
    done = 12 - len(StoreWriter.resume(out).pending_rows())
    assert 0 < done < 12
    second = extract(clip_set, model, out, batch_seconds=0.3, progress=False)
    assert second.resumed and not second.interrupted and out.exists()
    assert not partial_path(out).exists()
    a, b = featstore.open(full.path), featstore.open(out)
    assert list(a.column("id")) == list(b.column("id"))
    for i in range(12):
        for k in range(3):
            np.testing.assert_array_equal(a.frames(i, k), b.frames(i, k))
    assert featstore.check_store(out) == []


def test_resume_refuses_other_model(tiny_models, clip_set, tmp_path):
    out = tmp_path / "x.h5"

    def stop(i):
        raise KeyboardInterrupt

    extract(clip_set, str(tiny_models["wavlm"]), out, batch_seconds=0.3, progress=False, on_batch=stop)
    with pytest.raises(featstore.store.StoreMismatch, match="was started with other settings — encoder: there .*wavlm"):
        extract(clip_set, str(tiny_models["hubert"]), out, progress=False)


def test_bad_input_is_reported_per_item_and_the_rest_processed(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    good = (0.1 * rng.normal(size=2400)).astype(np.float32)
    write_wav(tmp_path / "good.wav", good)
    write_wav(tmp_path / "dup.wav", good)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    nan = good.copy()
    nan[100] = np.nan
    write_wav(tmp_path / "nan.wav", nan)
    write_wav(tmp_path / "short.wav", good[:399])
    stereo = np.stack([good, good], axis=1)
    x44 = np.interp(np.arange(int(len(good) * 44100 / 16000)) * 16000 / 44100, np.arange(len(good)), good).astype(np.float32)
    write_wav(tmp_path / "stereo44k.wav", np.stack([x44, x44], axis=1), sr=44100)
    rows = [
        {"id": "good", "path": "good.wav", "label": "a"},
        {"id": "good", "path": "dup.wav", "label": "b"},
        {"id": "garbage", "path": "garbage.wav", "label": "a"},
        {"id": "empty", "path": "empty.wav", "label": "a"},
        {"id": "nan", "path": "nan.wav", "label": "a"},
        {"id": "short", "path": "short.wav", "label": "a"},
        {"id": "missing", "path": "nowhere.wav", "label": "a"},
        {"id": "stereo", "path": "stereo44k.wav", "label": ""},
    ]
    del stereo
    man = write_manifest(tmp_path / "m.csv", rows)
    res = extract(man, str(tiny_models["wavlm"]), tmp_path / "s.h5", progress=False)
    status = {i: s for i, s, _ in res.failures}
    assert status == {"good": "duplicate_id", "garbage": "unreadable", "empty": "empty", "nan": "nan",
                      "short": "too_short", "missing": "missing"}
    msgs = {i: m for i, _, m in res.failures}
    assert msgs["good"] == "line 3: id 'good' already used on line 2"
    assert "399 samples" in msgs["short"] and "400 samples" in msgs["short"]
    assert "1 NaN/inf samples" in msgs["nan"]
    assert res.ok == 2
    with featstore.open(res.path) as store:
        items = store.items.set_index("id", drop=False)
        assert list(store.column("id")) == [r["id"] for r in rows]  # manifest order, nothing vanished
        assert list(store.column("status")) == ["ok", "duplicate_id", "unreadable", "empty", "nan", "too_short", "missing", "ok"]
        stereo_row = store.items.iloc[7]
        assert stereo_row["note"] == "down-mixed from 2 channels, resampled from 44100 Hz"
        assert stereo_row["num_frames"] == conv_formula(stereo_row["num_samples"]) > 0
        assert int(items["num_frames"].iloc[1:7].sum()) == 0
    assert featstore.check_store(res.path) == []


def test_manifest_errors_have_line_numbers(tiny_models, tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(2400, dtype=np.float32) + 0.01)
    man = tmp_path / "m.csv"
    man.write_text("path,label,start,end\na.wav,x,0.1,0.05\na.wav,y,zero,1\n,z,,\na.wav,w,0.01,0.1\n")
    res = extract(man, str(tiny_models["wavlm"]), tmp_path / "s.h5", progress=False)
    errors = [m for _, _, m in res.failures]
    assert errors == [
        "line 2: segment [0.1, 0.05) is empty or negative",
        "line 3: start/end are not numbers ('zero', '1')",
        "line 4: empty path",
        "line 5: id 'a' already used on line 2",
    ]


def test_segments_frames_by_centre(tiny_models, tmp_path):
    enc = SSLEncoder(tiny_models["wavlm"])
    # frame j has its centre at 199.5 + 320 j samples; [0.05 s, 0.1 s) = [800, 1600) samples -> j = 2, 3, 4
    assert segment_frames(enc, 20, 0.05, 0.1) == (2, 5)
    assert segment_frames(enc, 3, 0.05, 0.1) == (2, 3)  # clipped to the item's frames
    x = (0.1 * np.random.default_rng(0).normal(size=8000)).astype(np.float32)
    write_wav(tmp_path / "w.wav", x)
    man = write_manifest(tmp_path / "m.csv", [{"path": "w.wav", "label": "a", "start": 0.05, "end": 0.1, "speaker": "s1"}])
    whole = extract(man, str(tiny_models["wavlm"]), tmp_path / "whole.h5", progress=False)
    crop = extract(man, str(tiny_models["wavlm"]), tmp_path / "crop.h5", progress=False, crop_to_segment=True)
    w, c = featstore.open(whole.path).items.iloc[0], featstore.open(crop.path).items.iloc[0]
    assert (w["num_frames"], w["segment_start_frame"], w["segment_end_frame"]) == (conv_formula(8000), 2, 5)
    assert (c["num_samples"], c["num_frames"], c["segment_start_frame"]) == (800, conv_formula(800), -1)
    assert "cropped to [0.050, 0.100) s" in c["note"]
    assert w["group"] == "s1"


def test_textgrid_and_folder_manifests(tiny_models, tmp_path):
    x = (0.1 * np.random.default_rng(0).normal(size=16000)).astype(np.float32)
    write_wav(tmp_path / "spk1.wav", x)
    (tmp_path / "spk1.TextGrid").write_text(
        'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\ntiers? <exists>\nsize = 1\nitem []:\n'
        '    item [1]:\n        class = "IntervalTier"\n        name = "phones"\n        xmin = 0\n        xmax = 1\n'
        '        intervals: size = 3\n        intervals [1]:\n            xmin = 0\n            xmax = 0.3\n            text = "a"\n'
        '        intervals [2]:\n            xmin = 0.3\n            xmax = 0.5\n            text = "s"\n'
        '        intervals [3]:\n            xmin = 0.5\n            xmax = 1\n            text = "z"\n'
    )
    man = write_manifest(tmp_path / "m.csv", [{"path": "spk1.wav", "label": "Lateral", "speaker": "k1"}])
    res = extract(man, str(tiny_models["wavlm"]), tmp_path / "tg.h5", progress=False,
                  textgrid_tier="phones", textgrid_labels=["s", "z"])
    items = featstore.open(res.path).items
    assert list(items["id"]) == ["spk1_000", "spk1_001"]
    assert list(items["segment_label"]) == ["s", "z"]
    assert list(items["label"]) == ["Lateral", "Lateral"]
    # [0.3, 0.5) s = [4800, 8000) samples: centres 199.5 + 320 j -> j = 15 .. 24
    assert (items.loc[0, "segment_start_frame"], items.loc[0, "segment_end_frame"]) == (15, 25)
    # folder-per-label layout
    for label in ("Normal", "Lateral"):
        write_wav(tmp_path / "folder" / label / f"{label}1.wav", x[:3000])
    res = extract(tmp_path / "folder", str(tiny_models["wavlm"]), tmp_path / "f.h5", progress=False)
    items = featstore.open(res.path).items
    assert sorted(zip(items["id"], items["label"])) == [("Lateral_Lateral1", "Lateral"), ("Normal_Normal1", "Normal")]


def test_extra_columns_float16_and_plain_h5py(tiny_models, clip_set, tmp_path):
    res = extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "h.h5", dtype="float16", layers="0,2", progress=False)
    ref = featstore.open(extract(clip_set, str(tiny_models["wavlm"]), tmp_path / "f.h5", progress=False).path)
    with h5py.File(res.path, "r") as f:  # the documented layout, nothing but h5py and numpy
        assert f.attrs["format"] == "featstore" and f.attrs["format_version"] == 1
        assert sorted(f["layers"]) == ["00", "02"] and f["layers/02"].dtype == np.float16
        assert json.loads(f.attrs["layer_ids"]) == [0, 2]
        offset, n = f["items/offset"][:], f["items/num_frames"][:]
        ids = f["items/id"].asstr()[:]
        sex = f["items/sex"].asstr()[:]
        i = 5
        frames = f["layers/02"][offset[i] : offset[i] + n[i]]
    assert ids[5] == "c05" and list(sex[:2]) == ["F", "M"]
    np.testing.assert_allclose(frames.astype(np.float32), ref.frames(5, 2), atol=2e-2, rtol=1e-2)


def test_parse_layers():
    assert parse_layers("all", 13) == list(range(13))
    assert parse_layers("0-3,8,-1", 13) == [0, 1, 2, 3, 8, 12]
    with pytest.raises(ValueError, match=r"layer 13 does not exist: this encoder has layers 0\.\.12"):
        parse_layers("13", 13)


def test_finished_store_is_not_redone(tiny_models, clip_set, tmp_path):
    out = tmp_path / "s.h5"
    extract(clip_set, str(tiny_models["wavlm"]), out, progress=False)
    again = extract(clip_set, str(tiny_models["wavlm"]), out, progress=False)
    assert again.already_done


def _held_outputs_survive_the_next_encode(enc, seed: int = 0) -> None:
    """Extraction commits batch n while batch n + 1 is encoded: what ``encode`` returned must not be
    memory that the next call reuses (scratch buffers, cached tensors)."""
    rng = np.random.default_rng(seed)
    first = enc.encode([(0.1 * rng.normal(size=n)).astype(np.float32) for n in (2400, 3100, 1700)])
    kept = [[np.array(f, copy=True) for f in clip] for clip in first]
    enc.encode([(0.1 * rng.normal(size=n)).astype(np.float32) for n in (3100, 2400, 4000, 1700)])
    for clip, copy in zip(first, kept):
        for f, c in zip(clip, copy):
            assert f.tobytes() == c.tobytes()


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2", "hubert", "data2vec-audio"])
def test_ssl_outputs_are_not_reused_by_the_next_encode(tiny_models, kind):
    _held_outputs_survive_the_next_encode(SSLEncoder(tiny_models[kind]))


@pytest.mark.parametrize("name", ["logmel", "mfcc", "spectral"])
def test_front_end_outputs_are_not_reused_by_the_next_encode(name):
    from featstore.encoders.registry import load_encoder

    _held_outputs_survive_the_next_encode(load_encoder(name))

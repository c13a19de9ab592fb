"""Fine-tuning Whisper encoders on tiny local configs: the loss falls, frozen parts stay
bit-identical, the head pools only the frames that cover the clip, and the checkpoint extracts with
the window it was trained in (full 30-s window and a short context)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import featstore
from featstore.encoders.registry import load_encoder
from featstore.encoders.whisper import RECORDED_WINDOW_FILE, WhisperEncoder, read_recorded_window
from featstore.extract import extract
from featstore.finetune import ClassifierHead, FinetuneError, Item, WhisperBackbone, finetune, load_head
from tests.conftest import write_manifest, write_wav

LABELS = ("noise", "tone", "pulses")
D_MODEL = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """A tiny Whisper (2 encoder layers, d_model 16) with the real 30-s geometry and feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=D_MODEL, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, max_target_positions=16, max_source_positions=1500,
        num_mel_bins=80, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    model = WhisperModel(config)
    with torch.no_grad():  # a stronger conv stem than the 0.02-std init, so that the clip outweighs the positions
        model.encoder.conv1.weight.normal_(0, 0.3)
        model.encoder.conv2.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("tiny-whisper-ft")
    model.save_pretrained(path)
    WhisperFeatureExtractor().save_pretrained(path)
    return path


def _signal(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / 16000
    if label == "noise":
        x = rng.normal(size=n)
    elif label == "tone":
        x = np.sin(2 * np.pi * rng.uniform(400, 600) * t + rng.uniform(0, 6)) + 0.1 * rng.normal(size=n)
    else:  # a click train
        x = 0.1 * rng.normal(size=n)
        x[:: int(rng.uniform(120, 180))] += 5.0
    return (0.1 * x / x.std()).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """6 speakers x 6 clips of 0.1-0.25 s (every speaker says every class) + one 1.5-s clip."""
    root = tmp_path_factory.mktemp("wft_clips")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(6):
        for j in range(6):
            lab = LABELS[j % 3]
            p = write_wav(root / "wav" / f"s{s}_{j}.wav", _signal(lab, int(rng.uniform(0.1, 0.25) * 16000), rng))
            rows.append({"id": f"s{s}_{j}", "path": f"wav/{p.name}", "label": lab, "speaker": f"s{s}"})
    write_wav(root / "wav" / "long.wav", _signal("tone", 24000, rng))
    rows.append({"id": "long", "path": "wav/long.wav", "label": "tone", "speaker": "s0"})
    return write_manifest(root / "clips.csv", rows)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


FAST = dict(unfreeze_top=1, head_only_steps=40, epochs=2, batch_size=6, lr_head=1e-2, lr_backbone=1e-3, progress=False)


@pytest.fixture(scope="module", params=["full", "context"])
def trained(request, whisper_dir, clips, tmp_path_factory):
    context = None if request.param == "full" else 1.0
    out = tmp_path_factory.mktemp(f"wft_{request.param}") / "run"
    con, buf = _console()
    res = finetune(str(whisper_dir), clips, out, context_seconds=context, console=con, **FAST)
    return request.param, res, buf.getvalue()


def test_loss_falls_and_validation_beats_chance(trained):
    mode, res, text = trained
    first = float(np.mean(res.head_losses[:5]))
    assert first > 0.9  # ~ln 3 at the start
    assert res.history[-1]["train_loss"] < first - 0.3
    assert [h["epoch"] for h in res.history] == [0, 1, 2] and res.history[1]["phase"] == "head+top"
    assert res.best_val_balanced_accuracy >= 0.6  # chance: 1/3
    window = "window full-30s (30 s)" if mode == "full" else "window context (1 s)"
    assert window in text


def test_frozen_parts_bit_identical_top_changed(trained, whisper_dir):
    _, res, text = trained
    before = load_file(str(whisper_dir / "model.safetensors"))
    after = load_file(str(res.out / "model.safetensors"))
    assert before.keys() == after.keys()  # a whole WhisperModel: encoder and decoder
    top = [k for k in before if k.startswith(("encoder.layers.1.", "encoder.layer_norm."))]
    frozen = [k for k in before if k.startswith("encoder.") and k not in top]
    assert len(top) == 17 and any("conv1" in k for k in frozen) and "encoder.embed_positions.weight" in frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert all(not torch.equal(before[k], after[k]) for k in top)
    log = json.loads((res.out / "log.json").read_text())
    check = log["frozen_check"]
    assert check["unchanged"] and check["trainable_tensors"] == check["trainable_tensors_changed"] == 17
    assert check["frozen_tensors"] == len(frozen)
    assert f"{len(frozen)} frozen tensors" in text and "bit-identical after training; 17/17 unfrozen tensors changed" in text
    groups = {r["group"]: r for r in res.param_groups}
    assert groups["head"]["lr"] == 1e-2 and groups["backbone top 1 layer(s)"]["lr"] == 1e-3
    assert groups["feature encoder (conv stem)"]["trainable"] is False


def test_too_long_clip_skipped_in_context_only(trained):
    mode, res, _ = trained
    if mode == "full":
        assert res.skipped == [] and res.n_train + res.n_val == 37
    else:
        assert [(i, s) for i, s, _ in res.skipped] == [("long", "too_long")]
        assert "1.50 s is longer than the model's window (1.00 s)" in res.skipped[0][2]


def test_checkpoint_records_and_extracts_with_its_window(trained, whisper_dir, clips, tmp_path):
    mode, res, _ = trained
    context = None if mode == "full" else 1.0
    assert read_recorded_window(res.out) == (True, context)
    log = json.loads((res.out / "log.json").read_text())
    assert log["encoder"]["whisper_context_seconds"] == context and log["config"]["context_seconds"] == context
    # the base model, extracted in the same window; the fine-tuned one, with no window option
    base = extract(clips, str(whisper_dir), tmp_path / "base.h5", progress=False, audit_clips=0, console=_console()[0],
                   encoder_options={"context_seconds": context})
    tuned = extract(clips, str(res.out), tmp_path / "tuned.h5", progress=False, audit_clips=0, console=_console()[0])
    assert base.ok == tuned.ok == (37 if mode == "full" else 36)
    with featstore.open(tmp_path / "base.h5") as a, featstore.open(tmp_path / "tuned.h5") as b:
        assert b.attrs["whisper_window_mode"] == ("full-30s" if mode == "full" else "context")
        assert b.attrs["whisper_window_seconds"] == (30.0 if mode == "full" else 1.0)
        assert b.attrs["whisper_context_seconds"] == (1.0 if context else "")  # None is stored as ""
        assert b.attrs["whisper_window_source"] == "checkpoint" and "whisper_window_source" not in a.attrs
        items = b.items
        assert b.num_layers == 3
        for k in (0, 1):  # below the unfrozen layer: bit-identical
            assert np.array_equal(a.layer(k), b.layer(k))
        assert np.abs(a.layer(2) - b.layer(2)).max() > 1e-3
        # the saved head on the stored frames (ceil(n / 320) per clip) reproduces the validation score
        head, cfg = load_head(res.out)
        val = log["split"]["val_ids"]
        rows = [int(np.flatnonzero(items["id"] == v)[0]) for v in val]
        assert all(b.frames(i, 2).shape[0] == math.ceil(items["num_samples"][i] / 320) for i in rows)
        pooled = torch.from_numpy(np.stack([b.frames(i, 2).mean(0) for i in rows]))
        with torch.no_grad():
            pred = head(pooled).argmax(1).numpy()
    y = np.array([cfg["labels"].index(items["label"][i]) for i in rows])
    bacc = np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])
    assert bacc == pytest.approx(res.best_val_balanced_accuracy, abs=1e-6)


def test_explicit_window_overrides_the_recorded_one(trained):
    mode, res, _ = trained
    if mode == "full":
        enc = load_encoder(str(res.out), device="cpu", context_seconds=2.0)
        assert enc.context_seconds == 2.0 and "whisper_window_source" not in enc.extra_attrs
    else:
        enc = load_encoder(str(res.out), device="cpu", context_seconds=None)
        assert enc.extra_attrs["whisper_window_mode"] == "full-30s" and enc.positions == 1500


def _items(enc: WhisperEncoder, lengths, seed=0) -> list[Item]:
    rng = np.random.default_rng(seed)
    xs = [_signal("tone", n, rng) for n in lengths]
    return [Item(str(i), x, i % 3, "g", enc.num_frames(len(x)), (0, enc.num_frames(len(x)))) for i, x in enumerate(xs)]


@pytest.mark.parametrize("context", [None, 1.0])
def test_forward_pools_only_clip_frames_and_matches_extraction(whisper_dir, context):
    enc = WhisperEncoder(whisper_dir, context_seconds=context)
    items = _items(enc, [1700, 3900, 2500, 321])
    solo = [enc.encode([it.x])[0] for it in items]
    for cache_bytes in (1 << 30, 0):  # the cached frozen prefix, and recomputed every batch
        bb = WhisperBackbone(enc, cache_bytes=cache_bytes, base_dir=whisper_dir)
        groups = bb.parameter_groups(1)
        assert bb.start == 1
        for p in enc.encoder.parameters():
            p.requires_grad_(False)
        for _, p in groups["top"]:
            p.requires_grad_(True)
        bb.prefill(items, range(4))
        assert len(bb.cache.data) == (4 if cache_bytes else 0)
        hs, mask = bb.hidden_states(items, [0, 1, 2, 3])
        assert mask.sum(1).tolist() == [math.ceil(len(it.x) / 320) for it in items] == [6, 13, 8, 2]
        assert len(hs) == 3 and hs[0].shape[1] == 13  # cut to the longest clip's frames, not the window
        for k in range(3):
            for i, it in enumerate(items):
                np.testing.assert_allclose(hs[k][i, : it.frames].detach().numpy(), solo[i][k], atol=1e-4)
        head = ClassifierHead(D_MODEL, 3, "mean")
        head(head.summarize(hs, mask)).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in groups["top"])
        for _, p in groups["top"]:
            p.grad = None


def test_a_training_step_lowers_the_loss(whisper_dir):
    enc = WhisperEncoder(whisper_dir, context_seconds=1.0)
    items = _items(enc, [1700, 3900, 2500, 3000, 2000, 1500], seed=3)
    bb = WhisperBackbone(enc, base_dir=whisper_dir)
    groups = bb.parameter_groups(1)
    for p in enc.encoder.parameters():
        p.requires_grad_(False)
    params = [p for _, p in groups["top"]]
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(0)
    head = ClassifierHead(D_MODEL, 3, "attn", dropout=0.0)
    y = torch.tensor([it.label for it in items])
    batch = list(range(len(items)))
    opt = torch.optim.SGD([*head.parameters(), *params], lr=0.05)

    def loss() -> torch.Tensor:
        hs, mask = bb.hidden_states(items, batch)
        return torch.nn.functional.cross_entropy(head(head.summarize(hs, mask), mask), y)

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach()) - 1e-3


def test_trainable_conv_stem_and_all_layers(whisper_dir, clips, tmp_path):
    res = finetune(str(whisper_dir), clips, tmp_path / "run", context_seconds=0.5, freeze_feature_encoder=False,
                   pooling="weighted-layers", console=_console()[0],
                   **{**FAST, "unfreeze_top": 2, "head_only_steps": 5, "epochs": 1})
    before = load_file(str(whisper_dir / "model.safetensors"))
    after = load_file(str(res.out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder.conv1.weight", "encoder.conv2.weight", "encoder.layers.0.fc1.weight"} <= changed
    assert "encoder.embed_positions.weight" not in changed and res.frozen_unchanged
    assert not any(k.startswith("decoder.") for k in changed)
    groups = {r["group"]: r for r in res.param_groups}
    assert groups["feature encoder (conv stem)"]["trainable"] is True
    log = json.loads((res.out / "log.json").read_text())
    assert log["frozen_cache"]["clips_cached"] == 0  # nothing frozen below the trained stem
    weights = json.loads((res.out / "head_config.json").read_text())["layer_weights"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0)


def test_same_seed_same_log(whisper_dir, clips, tmp_path):
    logs = []
    for i in range(2):
        finetune(str(whisper_dir), clips, tmp_path / f"r{i}", context_seconds=0.5, seed=5, console=_console()[0],
                 **{**FAST, "head_only_steps": 5, "epochs": 1})
        log = json.loads((tmp_path / f"r{i}" / "log.json").read_text())
        logs.append({k: v for k, v in log.items() if k != "timing"})
    assert logs[0] == logs[1]


def test_user_errors(whisper_dir, clips, tmp_path, tiny_models):
    with pytest.raises(FinetuneError, match=r"^context_seconds must be a multiple of 0.02 s \(one encoder frame\), got 0.015$"):
        finetune(str(whisper_dir), clips, tmp_path / "a", context_seconds=0.015, console=_console()[0], **FAST)
    with pytest.raises(FinetuneError, match=r"^--context-seconds applies to Whisper models only; '.*wavlm' is wavlm$"):
        finetune(str(tiny_models["wavlm"]), clips, tmp_path / "b", context_seconds=1.0, console=_console()[0], **FAST)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / RECORDED_WINDOW_FILE).write_text('{"whisper_context_seconds": "one"}')
    with pytest.raises(ValueError, match=r"featstore_encoder.json: whisper_context_seconds must be a number of seconds or null, got 'one'$"):
        read_recorded_window(bad)
    (bad / RECORDED_WINDOW_FILE).write_text("{")
    with pytest.raises(ValueError, match=r"featstore_encoder.json: not a featstore window record \(JSONDecodeError"):
        read_recorded_window(bad)


def test_cli_finetune_then_extract_uses_the_recorded_window(whisper_dir, clips, tmp_path):
    from typer.testing import CliRunner

    from featstore_cli.featstore_app import app

    runner = CliRunner()
    run = tmp_path / "runs" / "w"
    r = runner.invoke(app, ["finetune", "--model", str(whisper_dir), "-m", str(clips), "-o", str(run), "--context-seconds", "0.5",
                            "--unfreeze-top", "1", "--head-only-steps", "5", "--epochs", "1", "--batch-size", "6"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps long lines
    assert "window context (0.5 s)" in text and f"next: featstore extract --model {run}" in text
    r = runner.invoke(app, ["extract", "--model", str(run), "-m", str(clips), "-o", str(tmp_path / "ft.h5")])
    assert r.exit_code == 0, r.output
    with featstore.open(tmp_path / "ft.h5") as store:
        assert store.attrs["whisper_context_seconds"] == 0.5 and store.attrs["whisper_window_source"] == "checkpoint"
        assert int((store.items["status"] == "too_long").sum()) == 1 + 0  # the 1.5-s clip
    r = runner.invoke(app, ["finetune", "--model", str(whisper_dir), "-m", str(clips), "-o", str(tmp_path / "x"),
                            "--context-seconds", "40"])
    assert r.exit_code == 2 and "context_seconds must be in (0, 30], got 40" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_cuda_and_amp(whisper_dir, clips, tmp_path, amp):
    res = finetune(str(whisper_dir), clips, tmp_path / "run", context_seconds=0.5, device="cuda", amp=amp,
                   console=_console()[0], **{**FAST, "head_only_steps": 5, "epochs": 1})
    assert res.frozen_unchanged and res.trainable_changed == 17
    log = json.loads((res.out / "log.json").read_text())
    assert log["config"]["device"] == "cuda" and log["config"]["amp"] == amp

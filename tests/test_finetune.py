"""Partial fine-tuning on tiny models: it learns, frozen parts stay bit-identical, the checkpoint extracts."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import featstore
from featstore.encoders.hf_ssl import SSLEncoder
from featstore.extract import extract
from featstore.cv import FoldError, holdout_split
from featstore.finetune import ClassifierHead, FinetuneError, Item, SSLBackbone, finetune, load_head, parse_fold
from tests.conftest import write_manifest, write_wav

LABELS = ("noise", "tone", "pulses")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (and a busy machine makes it costly)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    """8 speakers x 6 clips (0.1-0.25 s, every speaker says every class) + a missing file + a too-short clip."""
    root = tmp_path_factory.mktemp("ft_clips")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        for j in range(6):
            lab = LABELS[j % 3]
            p = write_wav(root / "wav" / f"s{s}_{j}.wav", _signal(lab, int(rng.uniform(0.1, 0.25) * 16000), rng))
            rows.append({"id": f"s{s}_{j}", "path": f"wav/{p.name}", "label": lab, "speaker": f"s{s}"})
    rows.append({"id": "gone", "path": "wav/gone.wav", "label": "tone", "speaker": "s0"})
    write_wav(root / "wav" / "short.wav", np.zeros(300, np.float32))
    rows.append({"id": "short", "path": "wav/short.wav", "label": "tone", "speaker": "s1"})
    return write_manifest(root / "clips.csv", rows)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


FAST = dict(head_only_steps=60, epochs=3, batch_size=8, lr_head=1e-2, lr_backbone=1e-3, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_models, clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_run") / "run"
    con, buf = _console()
    res = finetune(str(tiny_models["wavlm"]), clips, out, unfreeze_top=1, pooling="mean", console=con, **FAST)
    return res, buf.getvalue()


def test_loss_falls_and_validation_beats_chance(trained):
    res, _ = trained
    first = float(np.mean(res.head_losses[:5]))
    assert first > 0.95  # ~ln 3 at the start
    assert res.history[-1]["train_loss"] < first - 0.5
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert res.best_val_balanced_accuracy >= 0.8  # chance: 1/3
    assert res.n_train + res.n_val == 48


def test_frozen_parameters_bit_identical_unfrozen_changed(trained, tiny_models):
    res, text = trained
    before = load_file(str(tiny_models["wavlm"] / "model.safetensors"))
    after = load_file(str(res.out / "model.safetensors"))
    assert before.keys() == after.keys()
    top = [k for k in before if k.startswith("encoder.layers.1.")]
    frozen = [k for k in before if k not in top]
    assert len(top) == 19 and len(frozen) == 39
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in top)
    log = json.loads((res.out / "log.json").read_text())
    assert log["frozen_check"] == {"frozen_tensors": 39, "frozen_params": sum(before[k].numel() for k in frozen),
                                   "unchanged": True, "changed": [], "trainable_tensors": 19, "trainable_tensors_changed": 19}
    assert "39 frozen tensors" in text and "bit-identical after training; 19/19 unfrozen tensors changed" in text


def test_parameter_table_and_log(trained, tiny_models):
    res, text = trained
    before = load_file(str(tiny_models["wavlm"] / "model.safetensors"))
    groups = {r["group"]: r for r in res.param_groups}
    assert groups["head"]["params"] == 32 * 3 + 3 and groups["head"]["lr"] == 1e-2
    assert groups["backbone top 1 layer(s)"]["params"] == sum(v.numel() for k, v in before.items() if k.startswith("encoder.layers.1."))
    assert groups["feature encoder (CNN)"]["trainable"] is False
    assert "backbone top 1 layer(s)" in text and "1e-03" in text
    log = json.loads((res.out / "log.json").read_text())
    assert set(log["split"]["train_groups"]).isdisjoint(log["split"]["val_groups"])
    assert len(log["split"]["val_ids"]) == res.n_val and log["labels"] == sorted(LABELS)
    assert log["epochs"][0]["phase"] == "head" and log["epochs"][1]["phase"] == "head+top"
    assert log["best"]["epoch"] == res.best_epoch and len(log["head_phase"]["loss"]) == 60
    val = (res.out / "validation.csv").read_text().splitlines()
    assert val[0] == "id,path,label,speaker" and [v.split(",")[0] for v in val[1:]] == log["split"]["val_ids"]
    assert all(Path(v.split(",")[1]).is_file() for v in val[1:])


def test_bad_rows_are_skipped_with_a_message(trained):
    res, text = trained
    assert [(i, s) for i, s, _ in res.skipped] == [("gone", "missing"), ("short", "too_short")]
    assert "skipped 2 row(s):" in text
    assert "gone: missing file not found:" in text
    assert "short: too_short 0.019 s is shorter than one frame (400 samples)" in text


def test_saved_checkpoint_extracts_and_matches_training(trained, tiny_models, clips, tmp_path):
    res, _ = trained
    base = extract(clips, str(tiny_models["wavlm"]), tmp_path / "base.h5", progress=False, audit_clips=0, console=_console()[0])
    tuned = extract(clips, str(res.out), tmp_path / "tuned.h5", progress=False, audit_clips=0, console=_console()[0])
    assert (base.ok, tuned.ok) == (48, 48)
    with featstore.open(tmp_path / "base.h5") as a, featstore.open(tmp_path / "tuned.h5") as b:
        assert b.num_layers == 3
        for k in (0, 1):  # below the unfrozen layer: bit-identical
            assert np.array_equal(a.layer(k), b.layer(k))
        assert np.abs(a.layer(2) - b.layer(2)).max() > 1e-3
        # the saved head on the extracted (solo, unpadded) frames reproduces the validation score
        head, cfg = load_head(res.out)
        items = b.items
        val = json.loads((res.out / "log.json").read_text())["split"]["val_ids"]
        rows = [int(np.flatnonzero(items["id"] == v)[0]) for v in val]
        pooled = torch.from_numpy(np.stack([b.frames(i, 2).mean(0) for i in rows]))
        with torch.no_grad():
            pred = head(pooled).argmax(1).numpy()
    y = np.array([cfg["labels"].index(items["label"][i]) for i in rows])
    bacc = np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])
    assert bacc == pytest.approx(res.best_val_balanced_accuracy, abs=1e-6)


def test_same_seed_same_log_other_seed_differs(tiny_models, clips, tmp_path):
    logs = []
    for i, seed in enumerate((3, 3, 4)):
        finetune(str(tiny_models["hubert"]), clips, tmp_path / f"r{i}", unfreeze_top=1, pooling="attn", seed=seed,
                 console=_console()[0], **{**FAST, "head_only_steps": 20, "epochs": 2})
        log = json.loads((tmp_path / f"r{i}" / "log.json").read_text())
        logs.append({k: v for k, v in log.items() if k != "timing"})
    assert logs[0] == logs[1]
    assert logs[0]["head_phase"]["loss"] != logs[2]["head_phase"]["loss"]


def test_trainable_cnn_and_weighted_layers(tiny_models, clips, tmp_path):
    """Layer-norm CNN (batched with padding), trained; all layers unfrozen; the layer weights are learned."""
    res = finetune(str(tiny_models["wav2vec2-layer"]), clips, tmp_path / "run", unfreeze_top=9, freeze_feature_encoder=False,
                   pooling="weighted-layers", console=_console()[0], **{**FAST, "head_only_steps": 10, "epochs": 1})
    groups = {r["group"]: r for r in res.param_groups}
    assert groups["feature encoder (CNN)"]["trainable"] is True
    assert groups["backbone top 2 layer(s)"]["trainable"] is True
    before = load_file(str(tiny_models["wav2vec2-layer"] / "model.safetensors"))
    after = load_file(str(res.out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("feature_extractor.") for k in changed)
    assert "masked_spec_embed" not in changed and res.frozen_unchanged
    weights = json.loads((res.out / "head_config.json").read_text())["layer_weights"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0) and max(weights) - min(weights) > 1e-4


def test_equal_length_batches_for_data2vec(tiny_models, clips, tmp_path):
    res = finetune(str(tiny_models["data2vec-audio"]), clips, tmp_path / "run", unfreeze_top=1, console=_console()[0],
                   **{**FAST, "head_only_steps": 10, "epochs": 1})
    assert res.frozen_unchanged and res.trainable_changed == 16 and len(res.history) == 2


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2-layer"])
def test_training_forward_is_padding_exact_and_differentiable(tiny_models, kind):
    enc = SSLEncoder(tiny_models[kind])
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=n).astype(np.float32) for n in (1700, 3900, 2500)]
    items = [Item(str(i), enc.preprocess(x), 0, "g", enc.num_frames(len(x)), (0, enc.num_frames(len(x)))) for i, x in enumerate(xs)]
    bb = SSLBackbone(enc)
    groups = bb.parameter_groups(1, freeze_feature_encoder=kind != "wav2vec2-layer")
    for p in enc.model.parameters():
        p.requires_grad_(False)
    trained = [p for _, p in groups["top"] + groups["cnn"]]
    for p in trained:
        p.requires_grad_(True)
    bb.prefill(items, [0, 1, 2])  # a frozen CNN: frames cached once (no-op when the CNN trains)
    assert len(bb.cache.data) == (0 if bb.train_cnn else 3)
    hs, mask = bb.hidden_states(items, [0, 1, 2])
    assert mask.sum(1).tolist() == [it.frames for it in items] == [5, 11, 7]
    solo = [enc.encode([x])[0] for x in xs]
    for k in range(3):
        for i, it in enumerate(items):
            assert np.abs(hs[k][i, : it.frames].detach().numpy() - solo[i][k]).max() < 1e-4
    head = ClassifierHead(32, 3, "mean")
    head(head.summarize(hs, mask)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if kind == "wav2vec2-layer":  # the CNN trains: gradients reach it through the public forward
        assert any(n.startswith("feature_extractor.") for n, _ in groups["cnn"])


def test_forward_hidden_states_rejects_mixed_lengths_for_data2vec(tiny_models):
    enc = SSLEncoder(tiny_models["data2vec-audio"])
    waves = [torch.zeros(1700), torch.zeros(3900)]
    with pytest.raises(ValueError, match=r"data2vec-audio batches only clips of equal frame count, got \[5, 11\]"):
        enc.forward_hidden_states(waves)


@pytest.mark.parametrize("pooling", ["mean", "attn", "weighted-layers"])
def test_head_ignores_padded_frames(pooling):
    torch.manual_seed(0)
    head = ClassifierHead(8, 3, pooling, num_hidden_states=2).eval()
    hs = [torch.randn(2, 6, 8), torch.randn(2, 6, 8)]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    junk = [h.clone() for h in hs]
    for h in junk:
        h[1, 4:] = 1e3  # whatever the padded frames hold
    a = head(head.summarize(hs, mask), mask)
    b = head(head.summarize(junk, mask), mask)
    solo = head(head.summarize([h[1:, :4] for h in hs], mask[1:, :4]), mask[1:, :4])
    assert torch.equal(a, b)
    assert torch.allclose(a[1], solo[0], atol=1e-6)


def test_split_and_fold_errors(tiny_models, clips, tmp_path):
    y = np.repeat([0, 1], 10)
    groups = [f"s{i // 2}" for i in range(20)]
    tr, va = holdout_split(y, groups, (2, 5), seed=0)
    assert len(tr) + len(va) == 20 and not {groups[i] for i in tr} & {groups[i] for i in va}
    assert parse_fold("2/5") == (2, 5) and parse_fold(None) is None
    with pytest.raises(FinetuneError, match=r"^bad fold '6/5': use K/N with 1 <= K <= N and N >= 2, e.g. --fold 1/5$"):
        parse_fold("6/5")
    tr, va = holdout_split(y[:6], groups[:6], None)  # 3 groups: 1 of 3 folds
    assert len(va) == 2 and len({groups[i] for i in va}) == 1
    with pytest.raises(FoldError, match=r"^3 speaker group\(s\) cannot make 5 folds: use fewer folds \(--fold 1/3\)"):
        holdout_split(y[:6], groups[:6], (1, 5))
    # the trainer takes its split from featstore.cv and reports the same sentence as a user error
    with pytest.raises(FinetuneError, match=r"^8 speaker group\(s\) cannot make 9 folds: use fewer folds \(--fold 1/8\)"):
        finetune(str(tiny_models["wavlm"]), clips, tmp_path / "r", fold="1/9", console=_console()[0], **FAST)
    # the validation part is exactly fold K of featstore.cv.holdout_split over the usable clips
    res = finetune(str(tiny_models["wavlm"]), clips, tmp_path / "r2", unfreeze_top=0, fold="3/4", seed=2,
                   console=_console()[0], **{**FAST, "head_only_steps": 2, "epochs": 0})
    log = json.loads((res.out / "log.json").read_text())
    ids = [f"s{s}_{j}" for s in range(8) for j in range(6)]
    labels = [sorted(LABELS).index(LABELS[j % 3]) for s in range(8) for j in range(6)]
    _, va = holdout_split(labels, [i.split("_")[0] for i in ids], (3, 4), seed=2)
    assert log["split"]["val_ids"] == [ids[i] for i in va] and log["config"]["fold"] == "3/4"


def test_cli_user_errors(tiny_models, clips, tmp_path):
    import typer
    from typer.testing import CliRunner

    from featstore_cli.finetune_cmd import finetune as command

    app = typer.Typer()
    app.command()(command)
    app.command("noop")(lambda: None)  # keep `finetune` a subcommand
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "--model", str(tiny_models["wavlm"]), "-m", str(clips), "-o", str(tmp_path / "o"), "--pooling", "max"])
    assert r.exit_code == 2 and "pooling must be one of mean, attn, weighted-layers, not 'max'" in r.output
    r = runner.invoke(app, ["finetune", "--model", str(tmp_path / "nope"), "-m", str(clips), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no model directory at" in r.output
    r = runner.invoke(app, ["finetune", "--model", str(tiny_models["wavlm"]), "-m", str(clips), "-o", str(tmp_path / "o"), "--fold", "0/5"])
    assert r.exit_code == 2 and "bad fold '0/5'" in r.output and "Traceback" not in r.output


def test_segments_pool_over_their_own_frames(tiny_models, tmp_path):
    from featstore.finetune import load_items
    from featstore.manifest import read_manifest

    x = np.random.default_rng(0).normal(size=8000).astype(np.float32)  # 0.5 s: 24 frames
    write_wav(tmp_path / "a.wav", 0.1 * x)
    man = write_manifest(tmp_path / "m.csv", [
        {"id": "whole", "path": "a.wav", "label": "x", "speaker": "s0"},
        {"id": "seg", "path": "a.wav", "label": "y", "speaker": "s1", "start": 0.1, "end": 0.3},
        {"id": "tiny", "path": "a.wav", "label": "y", "speaker": "s1", "start": 0.1, "end": 0.105},
    ])
    con, buf = _console()
    items, skipped, labels = load_items(read_manifest(man), SSLBackbone(SSLEncoder(tiny_models["wavlm"])), con)
    # frame centres 199.5 + 320 k samples; [1600, 4800) holds k = 5..14
    assert [(it.id, it.frames, it.pool) for it in items] == [("whole", 24, (0, 24)), ("seg", 24, (5, 15))]
    assert skipped == [("tiny", "bad_segment", "segment [0.100, 0.105) s covers no frame")] and labels == ["x", "y"]


@pytest.mark.parametrize("phase", ["cache_frozen", "train_head", "train_top"])
def test_interrupt_at_each_phase_keeps_the_best_state(tiny_models, clips, tmp_path, monkeypatch, phase):
    """Ctrl-C in any phase: nothing to save before the first record (a clear error), else the best
    state so far is saved and the run is marked interrupted (the CLI exits with 130)."""
    from featstore.finetune import Trainer

    original = getattr(Trainer, phase)

    def interrupted(self):
        if phase == "train_top":  # after one batch of the first epoch
            self.cfg.epochs = 1
            original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, phase, interrupted)
    out = tmp_path / "run"
    options = dict(unfreeze_top=1, console=_console()[0], **{**FAST, "head_only_steps": 10, "epochs": 2})
    if phase in ("cache_frozen", "train_head"):
        with pytest.raises(FinetuneError, match=r"^nothing was trained \(head_only_steps=0 and epochs=0, or interrupted at once\)$"):
            finetune(str(tiny_models["wavlm"]), clips, out, **options)
        assert not (out / "log.json").exists()
        return
    res = finetune(str(tiny_models["wavlm"]), clips, out, **options)
    log = json.loads((out / "log.json").read_text())
    assert res.interrupted and log["interrupted"] and res.frozen_unchanged
    assert [h["epoch"] for h in log["epochs"]] == [0, 1] and (out / "model.safetensors").is_file()


def test_cli_exit_code_on_interrupt(tiny_models, clips, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from featstore_cli.finetune_cmd import finetune as command
    from featstore.finetune import Trainer

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_top", stop)
    app = typer.Typer()
    app.command()(command)
    app.command("noop")(lambda: None)
    r = CliRunner().invoke(app, ["finetune", "--model", str(tiny_models["wavlm"]), "-m", str(clips), "-o", str(tmp_path / "o"),
                                 "--head-only-steps", "5", "--unfreeze-top", "1"])
    assert r.exit_code == 130 and "interrupted" in r.output and (tmp_path / "o" / "head.pt").is_file()


def test_every_trainable_tensor_trains_with_stable_layer_norm(tiny_models, clips, tmp_path):
    """A do_stable_layer_norm model applies its final layer norm to last_hidden_state only, which no
    stored layer (hidden_states entry) holds: it is frozen, not listed as trainable and left unchanged."""
    res = finetune(str(tiny_models["wav2vec2-layer"]), clips, tmp_path / "run", unfreeze_top=1, console=_console()[0],
                   **{**FAST, "head_only_steps": 10, "epochs": 1})
    check = json.loads((res.out / "log.json").read_text())["frozen_check"]
    assert check["trainable_tensors"] == check["trainable_tensors_changed"] == res.trainable_changed == 16
    assert check["unchanged"]

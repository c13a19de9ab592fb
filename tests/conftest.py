"""Shared fixtures: tiny models saved with save_pretrained, and small audio sets."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def _import_this_checkouts_cli() -> None:
    """The folder ``cli/`` is installed as the package ``featstore_cli`` (pyproject's package-dir).
    Where that name is not installed, or an editable install maps it to another checkout, the tests
    import this checkout's folder under it, so they always run the code they sit beside."""
    spec = importlib.util.find_spec("featstore_cli")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == ROOT / "cli":
        return
    spec = importlib.util.spec_from_file_location("featstore_cli", ROOT / "cli" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "cli")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["featstore_cli"] = module
    spec.loader.exec_module(module)


_import_this_checkouts_cli()

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def save_tiny(kind: str, directory: Path, **overrides) -> Path:
    """Build a tiny randomly initialised SSL model from a config and save it with its feature extractor."""
    import torch
    from transformers import (Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel,
                              Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model, WavLMConfig, WavLMModel)

    torch.manual_seed(0)
    kinds = {
        "wavlm": (WavLMConfig, WavLMModel, {}),
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model, {}),
        "wav2vec2-layer": (Wav2Vec2Config, Wav2Vec2Model, dict(feat_extract_norm="layer", do_stable_layer_norm=True)),
        "hubert": (HubertConfig, HubertModel, {}),
        "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel, dict(num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, conv_pos_kernel_size=4)),
    }
    cfg_cls, model_cls, extra = kinds[kind]
    params = {**SMALL, **extra, **overrides}
    if kind == "data2vec-audio":
        params.pop("num_conv_pos_embeddings")
    cfg = cfg_cls(**params)
    model_cls(cfg).eval().save_pretrained(directory)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: save_tiny(k, root / k) for k in ("wavlm", "wav2vec2", "wav2vec2-layer", "hubert", "data2vec-audio")}


def write_wav(path: Path, x: np.ndarray, sr: int = 16000, subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, subtype=subtype)
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def clip_set(tmp_path) -> Path:
    """12 short clips (0.08-0.25 s), 3 labels, 4 speakers; returns the manifest path."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        n = int(rng.integers(1280, 4000))
        x = (0.1 * rng.normal(size=n)).astype(np.float32)
        p = write_wav(tmp_path / "wav" / f"c{i:02d}.wav", x)
        rows.append({"path": f"wav/{p.name}", "label": "abc"[i % 3], "speaker": f"s{i % 4}", "sex": "FM"[i % 2]})
    return write_manifest(tmp_path / "clips.csv", rows)

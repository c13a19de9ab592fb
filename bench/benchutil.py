"""Pieces the benchmark scripts share: the random-weight base WavLM and the load average."""
from __future__ import annotations

import os
from pathlib import Path


def base_wavlm(out: Path) -> Path:
    """Save a base-size WavLM from ``WavLMConfig()`` (random weights, the pretrained model's compute)."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    WavLMModel(WavLMConfig()).eval().save_pretrained(out)
    # the preprocessing wavlm-base-plus ships: no normalisation, attention mask returned
    Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(out)
    return out


def load_average() -> float:
    """The 1-minute load average (nan where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def load_text() -> str:
    """``load average 1.00, 0.80, 0.50`` (1, 5 and 15 minutes)."""
    try:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()
    except (OSError, AttributeError):
        return "load average unknown"

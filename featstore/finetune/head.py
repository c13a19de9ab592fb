"""The classification head: masked, true-length pooling of the backbone's frames, then a linear layer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from featstore.finetune.errors import FinetuneError

POOLINGS = ("mean", "attn", "weighted-layers")
HEAD_WEIGHTS, HEAD_CONFIG = "head.pt", "head_config.json"


class ClassifierHead(nn.Module):
    """Linear classifier over masked pooling of the backbone's frames.

    ``mean``: mean of the last layer's frames; ``attn``: attention-weighted mean of the last layer's
    frames (a learned score per frame, padded frames masked out); ``weighted-layers``: a learned
    softmax-weighted sum of all ``hidden_states``, then the mean over frames. :meth:`summarize`
    holds the parameter-free part (what a frozen backbone's output can be cached as), ``forward``
    the learned part.
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", num_hidden_states: int = 1,
                 dropout: float = 0.1, attn_dim: int = 128):
        super().__init__()
        if pooling not in POOLINGS:
            raise FinetuneError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.pooling = pooling
        if pooling == "attn":
            self.attention = nn.Sequential(nn.Linear(hidden_size, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        if pooling == "weighted-layers":
            self.layer_logits = nn.Parameter(torch.zeros(num_hidden_states))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def summarize(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Parameter-free pooling input from ``hidden_states`` (each ``(B, T, D)``) and the bool
        frame ``mask`` ``(B, T)``: ``(B, D)`` masked means (mean), ``(B, L, D)`` per-layer masked
        means (weighted-layers) or the last layer's frames zeroed at padding ``(B, T, D)`` (attn)."""
        m = mask.unsqueeze(-1).float()
        if self.pooling == "attn":
            return hidden_states[-1].float() * m
        count = m.sum(1).clamp_min(1.0)
        if self.pooling == "mean":
            return (hidden_states[-1].float() * m).sum(1) / count
        return torch.stack([(h.float() * m).sum(1) / count for h in hidden_states], dim=1)

    def forward(self, summary: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "mean":
            z = summary
        elif self.pooling == "weighted-layers":
            w = torch.softmax(self.layer_logits, dim=0)
            z = (w[None, :, None] * summary).sum(1)
        else:
            if mask is None:
                raise ValueError("attentive pooling needs the frame mask")
            scores = self.attention(summary).squeeze(-1).masked_fill(~mask, float("-inf"))
            z = (torch.softmax(scores, dim=1).unsqueeze(-1) * summary).sum(1)
        return self.classifier(self.dropout(z))

    def layer_weights(self) -> list[float] | None:
        if self.pooling != "weighted-layers":
            return None
        return [float(v) for v in torch.softmax(self.layer_logits.detach(), 0)]


def split_summary(pooling: str, summary: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-clip pieces of a batch summary (for caching), on the CPU; ``attn`` keeps only pooled frames."""
    s = summary.detach().cpu()
    if pooling == "attn":
        m = mask.cpu()
        return [s[i][m[i]].clone() for i in range(s.shape[0])]
    return [s[i].clone() for i in range(s.shape[0])]


def collate(pooling: str, pieces: list[torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of cached summary pieces (and the frame mask for ``attn``) on ``device``."""
    if pooling != "attn":
        return torch.stack(pieces).to(device), None
    lengths = torch.tensor([p.shape[0] for p in pieces])
    padded = nn.utils.rnn.pad_sequence(pieces, batch_first=True)
    mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
    return padded.to(device), mask.to(device)


def load_head(out: str | Path, map_location: str = "cpu") -> tuple[ClassifierHead, dict[str, Any]]:
    """The classification head saved by ``featstore finetune`` in ``out``, and its config (labels...)."""
    out = Path(out)
    cfg = json.loads((out / HEAD_CONFIG).read_text())
    head = ClassifierHead(cfg["hidden_size"], len(cfg["labels"]), cfg["pooling"], cfg["num_hidden_states"], cfg["dropout"])
    head.load_state_dict(torch.load(out / HEAD_WEIGHTS, map_location=map_location, weights_only=True))
    return head.eval(), cfg

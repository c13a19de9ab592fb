"""The interface every encoder (SSL model, Whisper, acoustic front end) implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np


class Encoder(ABC):
    """Turns mono clips at :attr:`sample_rate` into per-layer frame sequences.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`num_frames` and
    :meth:`encode`. ``encode`` must be *padding-exact* when :attr:`padding_exact` is true: an item's
    frames must not depend on which other clips share its batch.
    """

    #: what was asked for (hub id, local path or front-end name) — stored as ``encoder``
    name: str
    sample_rate: int = 16000
    frame_stride_samples: int
    receptive_field_samples: int
    #: sample index of frame 0's centre
    first_frame_center_samples: float
    #: width of each layer (len = number of layers)
    layer_dims: list[int]
    padding_exact: bool = True
    #: stored as ``encoder_config`` (JSON)
    config: dict[str, Any]
    #: further root attributes (e.g. a Whisper window); JSON-serialisable values
    extra_attrs: dict[str, Any]
    device: str = "cpu"

    @property
    def revision(self) -> str:
        """Commit hash or content hash where known — stored as ``encoder_revision``. May be set to
        a future (a content hash computed in the background while the model loads): read, it waits."""
        value = self.__dict__.get("_revision", "")
        if hasattr(value, "result"):
            value = self.__dict__["_revision"] = value.result()
        return value

    @revision.setter
    def revision(self, value) -> None:
        self.__dict__["_revision"] = value

    @property
    def num_layers(self) -> int:
        return len(self.layer_dims)

    @abstractmethod
    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` samples (0 when too short for one)."""

    @abstractmethod
    def encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Encode a batch of 1-D float32 clips (each with ``num_frames(len) > 0``).

        Returns, per clip, one ``(num_frames, layer_dims[k])`` float32 array per layer.
        """

    def min_samples(self) -> int:
        """Shortest clip that yields at least one frame."""
        n = 1
        while self.num_frames(n) == 0:
            n = n * 2 if n < self.receptive_field_samples else n + 1
            if n > 10 * self.sample_rate:
                break
        lo = max(1, n // 2)
        while lo < n and self.num_frames(lo) == 0:
            lo += 1
        return lo

    def padding_audit(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                      frames: Sequence[Sequence[np.ndarray]] | None = None) -> dict[str, Any]:
        """How far the common pipeline (zero-pad to ``pad_seconds``, full model) moves each layer.

        ``frames``: this encoder's own frames of ``clips`` (``encode(clips)``), when the caller has
        them already (an extraction reads them back from its store): then they are not recomputed.

        Returns ``{"clips": n, "pad_seconds": s, "max_abs": [...], "mean_abs": [...]}`` per layer,
        or ``{}`` when not applicable (front ends, whose frames are local).
        """
        return {}

    def frame_centers(self, num_frames: int) -> np.ndarray:
        """Centre of each frame, in samples."""
        return self.first_frame_center_samples + self.frame_stride_samples * np.arange(num_frames)

    def describe(self) -> dict[str, Any]:
        """Root attributes this encoder contributes to a store."""
        return {
            "encoder": self.name,
            "encoder_revision": self.revision,
            "encoder_config": self.config,
            "sample_rate": int(self.sample_rate),
            "frame_stride_samples": int(self.frame_stride_samples),
            "receptive_field_samples": int(self.receptive_field_samples),
            "first_frame_center_samples": float(self.first_frame_center_samples),
            "padding_exact": bool(self.padding_exact),
            **self.extra_attrs,
        }

"""What fine-tuning needs from an encoder, for each family: which parameters form the top layers,
the CNN and the frozen rest; the padding-exact forward with gradients (the encoders' public
``forward_hidden_states``); a cache of the frozen part's outputs; and how the checkpoint is saved.

* :class:`SSLBackbone` (wav2vec2, HuBERT, WavLM, data2vec-audio): the frozen CNN's frames are
  cached per clip; the transformer runs batched with the frame mask through the model's own forward.
* :class:`WhisperBackbone`: each clip in its own window (the full 30 s or ``context_seconds``);
  with a frozen conv stem the hidden state entering the first unfrozen layer is cached per clip, so
  an epoch runs only the unfrozen layers. The checkpoint is a whole ``WhisperModel`` (the decoder
  as loaded) with the feature extractor and the window record (``featstore_encoder.json``).

Both pool only the frames that cover the clip (``Encoder.num_frames``), or its segment's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from featstore.finetune.errors import FinetuneError


class FrozenCache:
    """Per-clip tensors computed by a frozen part, kept while they fit in ``budget_bytes``.

    A clip that no longer fits is recomputed whenever it is needed (same values, more time), so
    memory stays bounded whatever the corpus size.
    """

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.data: dict[int, Any] = {}
        self.bytes = 0
        self.refused: set[int] = set()

    def __contains__(self, i: int) -> bool:
        return i in self.data

    def __getitem__(self, i: int) -> Any:
        return self.data[i]

    def put(self, i: int, value: Any) -> None:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        size = sum(t.numel() * t.element_size() for t in _flat(tensors))
        if self.bytes + size <= self.budget:
            self.data[i] = value
            self.bytes += size
        else:
            self.refused.add(i)

    def describe(self) -> dict[str, Any]:
        return {"clips_cached": len(self.data), "clips_recomputed": len(self.refused),
                "bytes": int(self.bytes), "budget_bytes": self.budget}


def _flat(values: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        out += _flat(v) if isinstance(v, (list, tuple)) else [v]
    return out


def _pool_mask(items: Sequence[Any], batch: Sequence[int], t_max: int, device: str) -> torch.Tensor:
    """Bool ``(B, t_max)``: each clip's pooled frames (all its frames, or its segment's)."""
    mask = torch.zeros(len(batch), t_max, dtype=torch.bool)
    for k, i in enumerate(batch):
        a, b = items[i].pool
        mask[k, a:b] = True
    return mask.to(device)


class Backbone:
    """The common part: parameter groups, train/eval modes, autocast, the cache."""

    kind = ""
    #: the module whose parameters are grouped, trained and checked (a Hugging Face model)
    module: nn.Module
    #: transformer layers, ``hidden_size``, number of ``hidden_states`` entries
    num_layers: int
    hidden_size: int
    num_hidden_states: int
    #: batches must hold clips of equal frame count (data2vec-audio)
    equal_frames = False
    #: longest clip in samples (a window), ``None``: unbounded
    max_samples: int | None = None
    #: group label of the CNN in the parameter table
    cnn_label = "feature encoder (CNN)"

    def __init__(self, encoder: Any, amp: str | None, cache_bytes: int):
        self.encoder = encoder
        self.device = encoder.device
        self.cache = FrozenCache(cache_bytes)
        self.train_cnn = False
        self.top = 0
        dev = self.device.split(":")[0]
        if amp and dev == "cuda":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            self.autocast = lambda: torch.autocast(dev, enabled=False)

    def prepare_input(self, samples: np.ndarray) -> np.ndarray:
        """What an item keeps of its decoded samples (the model's per-clip preprocessing)."""
        return np.asarray(samples, dtype=np.float32)

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def layer_prefix(self, i: int) -> str:
        raise NotImplementedError

    def is_cnn(self, name: str) -> bool:
        raise NotImplementedError

    def extra_top_prefixes(self, top: int) -> list[str]:
        """Non-layer parameters trained with the top ``top`` layers (e.g. the final layer norm)."""
        return []

    def parameter_groups(self, unfreeze_top: int, freeze_feature_encoder: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """``top`` (the top ``unfreeze_top`` layers and what belongs to them), ``cnn`` (trainable only
        with ``freeze_feature_encoder=False``) and ``frozen`` (the rest). Sets what this backbone
        trains, and so what it may cache."""
        if unfreeze_top < 0:
            raise FinetuneError(f"unfreeze_top must be >= 0, not {unfreeze_top}")
        n = self.num_layers
        top = min(unfreeze_top, n)
        prefixes = [self.layer_prefix(i) for i in range(n - top, n)] + self.extra_top_prefixes(top)
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"top": [], "cnn": [], "frozen": []}
        for name, p in self.module.named_parameters():
            if self.is_cnn(name):
                groups["frozen" if freeze_feature_encoder else "cnn"].append((name, p))
            elif any(name.startswith(pre) for pre in prefixes):
                groups["top"].append((name, p))
            else:
                groups["frozen"].append((name, p))
        self.top = top
        self.train_cnn = bool(groups["cnn"])
        return groups

    def train_mode(self, training: bool) -> None:
        """Everything in eval mode (no LayerDrop, no SpecAugment); with ``training`` the unfrozen
        layers in train mode (their dropout)."""
        self.module.eval()
        if training:
            for layer in list(self.layers())[self.num_layers - self.top:]:
                layer.train()

    def prefill(self, items: Sequence[Any], idx: Sequence[int]) -> None:
        """Compute the frozen part's outputs for ``idx`` once, while the cache has room."""

    def hidden_states(self, items: Sequence[Any], batch: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``hidden_states`` of a batch (with gradients where parameters need them) and the bool
        pooling mask ``(B, T_max)``: each clip's true frames, or its segment's; never padding."""
        raise NotImplementedError

    def save(self, out: Path) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


# ---------------------------------------------------------------------------------------------


class SSLBackbone(Backbone):
    """A wav2vec2-family model (:class:`featstore.encoders.hf_ssl.SSLEncoder`)."""

    kind = "ssl"

    def __init__(self, encoder: Any, amp: str | None = None, cache_bytes: int = 2 << 30):
        super().__init__(encoder, amp, cache_bytes)
        self.module = encoder.model
        cfg = self.module.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.num_hidden_states = self.num_layers + 1
        self.equal_frames = not encoder.mask_exact

    def prepare_input(self, samples: np.ndarray) -> np.ndarray:
        return self.encoder.preprocess(samples)

    def layers(self) -> nn.ModuleList:
        return self.module.encoder.layers

    def layer_prefix(self, i: int) -> str:
        return f"encoder.layers.{i}."

    def is_cnn(self, name: str) -> bool:
        return name.startswith("feature_extractor.")

    def extra_top_prefixes(self, top: int) -> list[str]:
        """With every layer unfrozen, also the feature projection and the positional convolution,
        and the encoder layer norm where it lies on the path (before the layers). A
        ``do_stable_layer_norm`` model applies its layer norm after the last layer, to
        ``last_hidden_state`` only: no ``hidden_states`` entry (what the store holds and the head
        pools) depends on it, so it stays frozen."""
        if top < self.num_layers:
            return []
        extra = ["feature_projection.", "encoder.pos_conv_embed."]
        if not getattr(self.module.config, "do_stable_layer_norm", False):
            extra.append("encoder.layer_norm.")
        return extra

    def _waves(self, items: Sequence[Any], batch: Sequence[int]) -> list[torch.Tensor]:
        return [torch.from_numpy(items[i].x).to(self.device) for i in batch]

    @torch.no_grad()
    def prefill(self, items: Sequence[Any], idx: Sequence[int]) -> None:
        """The frozen CNN's frames, computed once in length-sorted chunks."""
        if self.train_cnn:
            return
        todo = sorted({int(i) for i in idx if i not in self.cache}, key=lambda i: len(items[i].x))
        step = self.encoder.cnn_chunk
        for b in range(0, len(todo), step):
            chunk = todo[b : b + step]
            for i, f in zip(chunk, self.encoder.cnn_outputs(self._waves(items, chunk))):
                self.cache.put(i, f.float())

    def _cnn_frames(self, items: Sequence[Any], batch: Sequence[int]) -> list[torch.Tensor]:
        if self.train_cnn:
            return self.encoder.cnn_outputs(self._waves(items, batch))
        missing = [i for i in batch if i not in self.cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                fresh = {i: f.float() for i, f in zip(missing, self.encoder.cnn_outputs(self._waves(items, missing)))}
            for i, f in fresh.items():
                self.cache.put(i, f)
        return [self.cache[i] if i in self.cache else fresh[i] for i in batch]

    def hidden_states(self, items: Sequence[Any], batch: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self._cnn_frames(items, batch)  # outside autocast: the CNN runs in float32
        with self.autocast():
            hs, lengths = self.encoder.forward_hidden_states(self._waves(items, batch), feats)
        return hs, _pool_mask(items, batch, max(lengths), self.device)

    def save(self, out: Path) -> None:
        self.module.save_pretrained(out)
        self.encoder.feature_extractor.save_pretrained(out)


class WhisperBackbone(Backbone):
    """A Whisper encoder (:class:`featstore.encoders.whisper.WhisperEncoder`) in its window."""

    kind = "whisper"
    cnn_label = "feature encoder (conv stem)"

    def __init__(self, encoder: Any, amp: str | None = None, cache_bytes: int = 2 << 30, base_dir: Path | None = None):
        super().__init__(encoder, amp, cache_bytes)
        self.module = encoder.encoder
        self.num_layers = len(self.module.layers)
        self.hidden_size = int(self.module.config.d_model)
        self.num_hidden_states = self.num_layers + 1
        self.max_samples = int(encoder.max_samples)
        self.base_dir = base_dir

    def layers(self) -> nn.ModuleList:
        return self.module.layers

    def layer_prefix(self, i: int) -> str:
        return f"layers.{i}."

    def is_cnn(self, name: str) -> bool:
        return name.startswith(("conv1.", "conv2."))

    def extra_top_prefixes(self, top: int) -> list[str]:
        return ["layer_norm."] if top > 0 else []  # the final layer norm, after the last layer

    @property
    def start(self) -> int | None:
        """Index of the first unfrozen layer when the part below it is frozen (cacheable), else None."""
        if self.train_cnn or self.top == 0:
            return None
        return self.num_layers - self.top

    def _frozen_part(self, items: Sequence[Any], batch: Sequence[int]) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per clip: the whole-window hidden state entering the first unfrozen layer, and the frozen
        hidden states ``0..start`` cut to the clip's frames."""
        enc, s = self.encoder, self.start
        with torch.no_grad(), self.autocast():
            x = enc.embed(enc.log_mel([items[i].x for i in batch]))
            states = [x] + enc.run_layers(x, 0, s)
        return {i: (states[s][k].clone(), [h[k, : items[i].frames].clone() for h in states])
                for k, i in enumerate(batch)}

    def prefill(self, items: Sequence[Any], idx: Sequence[int], chunk: int = 8) -> None:
        """The frozen part's outputs, computed once (while the cache has room)."""
        if self.start is None:
            return
        todo = [int(i) for i in idx if i not in self.cache]
        for b in range(0, len(todo), chunk):
            if self.cache.refused:
                return  # full: the rest is computed per batch
            for i, value in self._frozen_part(items, todo[b : b + chunk]).items():
                self.cache.put(i, value)

    def hidden_states(self, items: Sequence[Any], batch: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        enc = self.encoder
        keep = max(items[i].frames for i in batch)
        if self.start is None:
            with self.autocast():
                hs = enc.forward_hidden_states(enc.log_mel([items[i].x for i in batch]), keep)
            return hs, _pool_mask(items, batch, keep, self.device)
        missing = [i for i in batch if i not in self.cache]
        fresh = self._frozen_part(items, missing) if missing else {}
        for i, value in fresh.items():
            self.cache.put(i, value)
        parts = [self.cache[i] if i in self.cache else fresh[i] for i in batch]
        prefix = torch.stack([p[0] for p in parts])
        lower = [torch.stack([nn.functional.pad(p[1][k], (0, 0, 0, keep - p[1][k].shape[0])) for p in parts])
                 for k in range(self.start + 1)]
        with self.autocast():
            upper = enc.run_layers(prefix, self.start, keep=keep)
        return lower + upper, _pool_mask(items, batch, keep, self.device)

    def save(self, out: Path) -> None:
        """A whole ``WhisperModel`` (the decoder as in the base checkpoint, the trained encoder), the
        feature extractor, and the window it was trained with (``featstore_encoder.json``)."""
        from transformers import WhisperModel

        from featstore.encoders.whisper import write_recorded_window

        model = WhisperModel.from_pretrained(str(self.base_dir), dtype=torch.float32)
        model.encoder.load_state_dict(self.module.state_dict())
        model.save_pretrained(out)
        self.encoder.feature_extractor.save_pretrained(out)
        write_recorded_window(out, self.encoder.context_seconds)

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        return {"kind": self.kind, "whisper_window_mode": enc.extra_attrs["whisper_window_mode"],
                "whisper_window_seconds": enc.window_seconds, "whisper_context_seconds": enc.context_seconds}


def open_backbone(model: str, device: str, amp: str | None, context_seconds: Any, cache_bytes: int) -> tuple[Backbone, str]:
    """The backbone for ``model`` (alias, hub id or model directory) and its revision."""
    import json

    from featstore.encoders.registry import SSL_MODEL_TYPES, resolve_pretrained
    from featstore.encoders.whisper import RECORDED

    local, revision = resolve_pretrained(model)
    model_type = json.loads((local / "config.json").read_text()).get("model_type", "")
    if model_type == "whisper":
        from featstore.encoders.whisper import WhisperEncoder

        try:
            enc = WhisperEncoder(local, name=model, revision=revision, device=device, context_seconds=context_seconds)
        except ValueError as exc:
            raise FinetuneError(str(exc)) from None
        return WhisperBackbone(enc, amp, cache_bytes, base_dir=local), revision
    if model_type in SSL_MODEL_TYPES:
        if not (isinstance(context_seconds, str) and context_seconds == RECORDED):
            raise FinetuneError(f"--context-seconds applies to Whisper models only; '{model}' is {model_type}")
        from featstore.encoders.hf_ssl import SSLEncoder

        return SSLBackbone(SSLEncoder(local, name=model, revision=revision, device=device), amp, cache_bytes), revision
    raise FinetuneError(f"model '{model}' has model_type '{model_type}'; finetune supports "
                        f"{', '.join(SSL_MODEL_TYPES)} and whisper")

"""Hugging Face speech SSL models (wav2vec2, HuBERT, WavLM, data2vec-audio), padding-exact.

How batches stay exact: each clip is normalised over its own samples (as the checkpoint's feature
extractor says), the CNN feature encoder runs on padded chunks whose valid frames depend only on
real samples — for group-norm checkpoints, which normalise every channel over time, with that norm
taken over each clip's own valid conv outputs (:func:`masked_group_norm_cnn`) — and the transformer
runs batched with a frame mask. The model's own forward is used throughout: its feature encoder is
swapped for a module that hands over the precomputed frames, so ``hidden_states`` are exactly what
the model returns.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featstore.encoders.base import Encoder


class _Precomputed(nn.Module):
    """Stands in for the CNN feature encoder: returns frames computed beforehand."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features  # (batch, channels, frames)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return self.features


def _conv_lengths(lengths: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    return torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1


def group_norm_batchable(feature_encoder: nn.Module) -> bool:
    """Whether the CNN is the wav2vec2 group-norm kind that :func:`masked_group_norm_cnn` handles:
    conv -> GroupNorm(groups == channels) -> activation, then conv -> activation layers."""
    layers = list(getattr(feature_encoder, "conv_layers", []))
    if not layers or not all(hasattr(m, "conv") and hasattr(m, "activation") for m in layers):
        return False
    gn = getattr(layers[0], "layer_norm", None)
    return (isinstance(gn, nn.GroupNorm) and gn.num_groups == gn.num_channels
            and all(not hasattr(m, "layer_norm") for m in layers[1:]))


def masked_group_norm_cnn(feature_encoder: nn.Module, waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The group-norm CNN over a padded batch, exact per clip: ``(B, C, T_max)`` and frame counts.

    The first layer's GroupNorm (one group per channel) normalises each channel over time, so
    padding would move every frame; here each clip's mean and variance are taken over its own
    valid conv outputs only. The later layers are plain convolutions, whose valid outputs depend
    only on valid inputs. Frames beyond a clip's count are zero. Equal to running each clip alone
    up to float rounding (~1e-6).
    """
    layers = list(feature_encoder.conv_layers)
    device = waves[0].device
    lengths = torch.tensor([len(w) for w in waves], device=device)
    h = torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True)[:, None]
    for i, layer in enumerate(layers):
        h = layer.conv(h)
        lengths = _conv_lengths(lengths, layer.conv)
        if i == 0:
            gn = layer.layer_norm
            h = h.float()  # statistics in float32 under autocast too, as torch's GroupNorm does
            valid = (torch.arange(h.shape[-1], device=device)[None] < lengths[:, None])[:, None].to(h.dtype)
            count = lengths.clamp(min=1).to(h.dtype)[:, None, None]
            mean = (h * valid).sum(-1, keepdim=True) / count
            dev = (h - mean) * valid  # two-pass variance: no cancellation when |mean| >> std
            var = torch.linalg.vector_norm(dev, dim=-1, keepdim=True).square() / count
            scale = torch.rsqrt(var + gn.eps)
            if gn.affine:
                scale = scale * gn.weight.float()[None, :, None]
                h = torch.addcmul(gn.bias.float()[None, :, None] - mean * scale, h, scale)
            else:
                h = torch.addcmul(-mean * scale, h, scale)
        h = layer.activation(h)
    counts = [int(t) for t in lengths.clamp(min=0).tolist()]
    valid = torch.arange(h.shape[-1], device=device)[None] < lengths[:, None]
    return h * valid[:, None].to(h.dtype), counts


@contextmanager
def _feature_encoder_swapped(model: nn.Module, features: torch.Tensor) -> Iterator[None]:
    original = model.feature_extractor
    model.feature_extractor = _Precomputed(features)
    try:
        yield
    finally:
        model.feature_extractor = original


class SSLEncoder(Encoder):
    """A wav2vec2-family model; layer k = ``hidden_states[k]`` of a solo run of the clip."""

    def __init__(
        self,
        local_dir: str | Path,
        name: str | None = None,
        revision: str = "",
        device: str = "cpu",
        amp: str | None = None,
        layers: Sequence[int] | None = None,
    ):
        from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        local_dir = Path(local_dir)
        self.name = name or str(local_dir)
        self.revision = revision
        self.device = device
        self.model = AutoModel.from_pretrained(str(local_dir), dtype=torch.float32).to(device).eval()
        cfg = self.model.config
        if (local_dir / "preprocessor_config.json").exists():
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(local_dir))
            fe_note = ""
        else:
            self.feature_extractor = Wav2Vec2FeatureExtractor()
            fe_note = "no preprocessor_config.json: Wav2Vec2FeatureExtractor defaults used"
        self.do_normalize = bool(getattr(self.feature_extractor, "do_normalize", False))
        self.sample_rate = int(getattr(self.feature_extractor, "sampling_rate", 16000))
        self.group_norm_cnn = getattr(cfg, "feat_extract_norm", "group") != "layer"
        # group-norm CNNs run batched with a masked norm when their layout is the known one,
        # otherwise one clip at a time
        self.cnn_per_clip = self.group_norm_cnn and not group_norm_batchable(self.model.feature_extractor)
        # data2vec-audio's positional embedding is a stack of convolutions: values at masked
        # positions leak into real frames after the first one, so it only batches clips of equal
        # frame count (no mask needed at all then).
        self.mask_exact = cfg.model_type != "data2vec-audio"
        kernels, strides = list(cfg.conv_kernel), list(cfg.conv_stride)
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (k - 1) * jump
            jump *= s
        self.frame_stride_samples = jump
        self.receptive_field_samples = rf
        self.first_frame_center_samples = (rf - 1) / 2
        n_hidden = cfg.num_hidden_layers + 1
        self.layer_ids = list(range(n_hidden)) if layers is None else sorted(set(int(k) for k in layers))
        if any(k < 0 or k >= n_hidden for k in self.layer_ids):
            raise ValueError(f"layers must lie in 0..{n_hidden - 1} for this model")
        self.layer_dims = [int(cfg.hidden_size)] * len(self.layer_ids)
        self.padding_exact = True
        self.amp = amp
        self.config = cfg.to_dict()
        self.extra_attrs: dict[str, Any] = {
            "feature_extractor_config": json.dumps(self.feature_extractor.to_dict(), sort_keys=True, default=str),
            "cnn_mode": ("per-clip" if self.cnn_per_clip else
                         "batched, masked group norm" if self.group_norm_cnn else "batched"),
            "transformer_batching": "masked" if self.mask_exact else "equal-length",
            "do_normalize": self.do_normalize,
        }
        if fe_note:
            self.extra_attrs["encoder_note"] = fe_note
        self.stats = {"frames": 0, "padded_frames": 0, "batches": 0}

    # ------------------------------------------------------------------------------------------
    def num_frames(self, num_samples: int) -> int:
        if num_samples < self.receptive_field_samples:
            return 0
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(int(num_samples))).item())

    def preprocess(self, clip: np.ndarray) -> np.ndarray:
        """The checkpoint's per-clip normalisation, over the clip's own samples."""
        x = np.asarray(clip, dtype=np.float32)
        if self.do_normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return x.astype(np.float32, copy=False)

    def _autocast(self):
        if self.amp in (None, "", "fp32"):
            return torch.autocast(device_type=self.device.split(":")[0], enabled=False)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    #: clips per CNN call: large padded batches of 16-kHz samples overflow the CPU caches (one
    #: 400-clip call measured ~20 % slower than clip by clip; chunks of 8-16 ~25 % faster)
    cnn_chunk = 16

    def cnn_outputs(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each preprocessed wave's CNN frames ``(C, num_frames)``, as if run alone.

        Runs in chunks of :attr:`cnn_chunk` clips (one at a time for an unknown group-norm layout);
        gradients flow where autograd is on (fine-tuning the CNN).
        """
        fe = self.model.feature_extractor
        out: list[torch.Tensor] = []
        step = 1 if self.cnn_per_clip else self.cnn_chunk
        for a in range(0, len(waves), step):
            chunk = list(waves[a : a + step])
            if self.cnn_per_clip:
                h = fe(chunk[0][None])
            elif self.group_norm_cnn:
                h, _ = masked_group_norm_cnn(fe, chunk)
            else:  # layer norm: valid frames depend on real samples only
                h = fe(torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True))
            out += [h[j, :, : self.num_frames(len(w))] for j, w in enumerate(chunk)]
        return out

    def forward_hidden_states(self, waves: Sequence[torch.Tensor], cnn_features: Sequence[torch.Tensor] | None = None
                              ) -> tuple[list[torch.Tensor], list[int]]:
        """The padding-exact forward of a batch: ``hidden_states`` ``[(B, T_max, D)] * (layers+1)`` and
        each clip's frame count.

        ``waves``: the clips after :meth:`preprocess`, 1-D tensors on the device. ``cnn_features``:
        each clip's CNN frames ``(C, frames)`` from :meth:`cnn_outputs`, when computed beforehand (a
        frozen feature encoder's frames cached once); computed here when ``None``. The model's own
        forward runs with its feature encoder swapped for these frames and the sample mask, so the
        result is what the model returns for each clip alone. There is no ``torch.no_grad`` here:
        gradients reach every parameter that requires them (fine-tuning); extraction calls it under
        ``torch.inference_mode()``. Frames beyond a clip's count are padding: never pool them.
        A model that batches only clips of equal frame count (:attr:`mask_exact` false:
        data2vec-audio) raises ``ValueError`` on a batch of unequal ones.
        """
        feats = list(cnn_features) if cnn_features is not None else self.cnn_outputs(waves)
        lengths = [int(f.shape[-1]) for f in feats]
        if not self.mask_exact and len(set(lengths)) > 1:
            raise ValueError(f"{self.config.get('model_type')} batches only clips of equal frame count, got {sorted(set(lengths))}")
        t_max = max(lengths)
        full = torch.stack([nn.functional.pad(f, (0, t_max - t)) for f, t in zip(feats, lengths)])
        mask = torch.zeros(len(waves), max(len(w) for w in waves), dtype=torch.long, device=self.device)
        for i, w in enumerate(waves):
            mask[i, : len(w)] = 1
        dummy = torch.zeros(len(waves), 1, device=self.device)
        with _feature_encoder_swapped(self.model, full), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            out = self.model(dummy, attention_mask=mask, output_hidden_states=True)
        return list(out.hidden_states), lengths

    @torch.inference_mode()
    def hidden_states(self, clips: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list[int]]:
        """All ``hidden_states`` of a batch, ``[(B, T_max, D)] * (layers+1)``, and true lengths."""
        waves = [torch.from_numpy(self.preprocess(c)).to(self.device) for c in clips]
        with self._autocast():
            hidden, lengths = self.forward_hidden_states(waves)
        self.stats["frames"] += sum(lengths)
        self.stats["padded_frames"] += len(lengths) * max(lengths) - sum(lengths)
        self.stats["batches"] += 1
        return hidden, lengths

    def encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        if not self.mask_exact:
            groups: dict[int, list[int]] = {}
            for i, c in enumerate(clips):
                groups.setdefault(self.num_frames(len(c)), []).append(i)
            if len(groups) > 1:
                out: list[list[np.ndarray]] = [[] for _ in clips]
                for idx in groups.values():
                    for i, frames in zip(idx, self._encode([clips[i] for i in idx])):
                        out[i] = frames
                return out
        return self._encode(clips)

    def _encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        hs, lengths = self.hidden_states(clips)
        stacked = torch.stack([hs[k] for k in self.layer_ids]).float().cpu().numpy()  # (L, B, T, D)
        return [[np.ascontiguousarray(stacked[k, i, :t]) for k in range(len(self.layer_ids))] for i, t in enumerate(lengths)]

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def common_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0) -> list[list[np.ndarray]]:
        """What the usual recipe computes: the feature extractor pads/truncates every clip to
        ``pad_seconds`` and the full model runs on the padded batch (with the attention mask only
        when the checkpoint's feature extractor returns one). Returns each clip's true frames."""
        n_pad = int(round(pad_seconds * self.sample_rate))
        inputs = self.feature_extractor(
            [np.asarray(c, dtype=np.float32) for c in clips], sampling_rate=self.sample_rate,
            padding="max_length", max_length=n_pad, truncation=True, return_attention_mask=True,
            return_tensors="pt",
        )
        kwargs = {}
        if getattr(self.feature_extractor, "return_attention_mask", False):
            kwargs["attention_mask"] = inputs["attention_mask"].to(self.device)
        with self._autocast(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            out = self.model(inputs["input_values"].to(self.device), output_hidden_states=True, **kwargs)
        stacked = torch.stack([out.hidden_states[k] for k in self.layer_ids]).float().cpu().numpy()
        lengths = [self.num_frames(min(len(c), n_pad)) for c in clips]
        return [[stacked[k, i, :t] for k in range(len(self.layer_ids))] for i, t in enumerate(lengths)]

    @torch.inference_mode()
    def padded_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                        keep_padding: bool = False) -> list[list[np.ndarray]]:
        """The usual recipe as it is usually written, for ``featstore extract --emulate-padding``:
        ``feature_extractor(clips, padding="max_length", max_length=n, truncation=True)`` with the
        checkpoint's own feature-extractor defaults — its attention mask (and with it a normalisation
        over each clip's own samples) only where it returns one; without one, ``do_normalize``
        normalises the padded vector, zeros included — then the full model on that batch, the mask
        passed only when returned. Returns each clip's true frames (of the clip as cut), or with
        ``keep_padding`` every frame of the padded input. (:meth:`common_pipeline` always asks for
        the mask, so its normalisation can differ from this one.)"""
        n_pad = int(round(float(pad_seconds) * self.sample_rate))
        full = self.num_frames(n_pad)
        if full == 0:
            raise ValueError(f"--emulate-padding {pad_seconds:g} s is shorter than one frame of this model "
                             f"({self.receptive_field_samples / self.sample_rate:g} s)")
        inputs = self.feature_extractor([np.asarray(c, dtype=np.float32) for c in clips], sampling_rate=self.sample_rate,
                                        padding="max_length", max_length=n_pad, truncation=True, return_tensors="pt")
        kwargs = {"attention_mask": inputs["attention_mask"].to(self.device)} if "attention_mask" in inputs else {}
        with self._autocast(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            out = self.model(inputs["input_values"].to(self.device), output_hidden_states=True, **kwargs)
        stacked = torch.stack([out.hidden_states[k] for k in self.layer_ids]).float().cpu().numpy()
        true = [self.num_frames(min(len(c), n_pad)) for c in clips]
        self.stats["frames"] += sum(true)
        self.stats["padded_frames"] += len(clips) * full - sum(true)
        self.stats["batches"] += 1
        keep = [full if keep_padding else t for t in true]
        return [[np.ascontiguousarray(stacked[k, i, :t]) for k in range(len(self.layer_ids))] for i, t in enumerate(keep)]

    def padding_audit(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0) -> dict[str, Any]:
        clips = [c for c in clips if self.num_frames(len(c)) > 0][:8]
        if not clips:
            return {}
        padded = self.common_pipeline(clips, pad_seconds)
        solo = [self.encode([c])[0] for c in clips]
        nl = len(self.layer_ids)
        max_abs = [max(float(np.abs(p[k] - s[k]).max()) for p, s in zip(padded, solo)) for k in range(nl)]
        mean_abs = [float(np.mean([np.abs(p[k] - s[k]).mean() for p, s in zip(padded, solo)])) for k in range(nl)]
        return {
            "clips": len(clips), "pad_seconds": pad_seconds,
            "attention_mask": bool(getattr(self.feature_extractor, "return_attention_mask", False)),
            "median_clip_seconds": float(np.median([len(c) for c in clips]) / self.sample_rate),
            "layers": self.layer_ids, "max_abs": max_abs, "mean_abs": mean_abs,
        }

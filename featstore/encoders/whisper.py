"""Whisper encoders: every encoder hidden state, frame level, for the frames that cover the clip.

Window semantics (recorded in the store as ``whisper_window_mode``, ``whisper_window_seconds`` and
``whisper_context_seconds``):

- ``"full-30s"`` (default): Whisper's own input. The clip is zero-padded to the 30-s window, the
  log-Mel is computed and normalised over that window exactly as ``WhisperFeatureExtractor`` does
  (log10, floor at max - 8, (x + 4) / 4), and the encoder runs on all 1500 positions. A clip's
  features are therefore those of the clip alone in its window, whatever shares its batch.
- ``"context"`` (``context_seconds=S``): the encoder runs on the first ``S`` seconds of that same
  log-Mel (``S * 100`` Mel frames; the normalisation still uses the 30-s window's maximum, so the
  Mel frames are an exact slice) with the positional embeddings sliced to the first ``S * 50``
  positions, as whisper.cpp's audio context does. Much faster, but self-attention sees a shorter
  window of silence, so the features differ from the 30-s run (:meth:`WhisperEncoder.padding_audit`
  measures by how much).

Clips longer than the window raise a ``ValueError`` (no silent truncation; the window bounds the
clip length: :attr:`WhisperEncoder.max_samples`).

A fine-tuned checkpoint (``featstore finetune``) records the window it was trained with in
``featstore_encoder.json`` beside its weights (:func:`write_recorded_window`). When the caller does
not choose a window, :class:`WhisperEncoder` uses the recorded one (store attribute
``whisper_window_source = "checkpoint"``); an explicit ``context_seconds`` (``None`` = the full
window) overrides it.

Frame geometry (derived from the feature extractor and the conv stack, never hard-coded):

- The log-Mel STFT is centred (``torch.stft(center=True)``, reflect padding of ``n_fft // 2``), so
  Mel frame ``t`` is centred on sample ``t * hop`` (hop 160) and spans ``n_fft`` = 400 samples.
- ``conv1`` (kernel 3, stride 1, padding 1) keeps the centres; ``conv2`` (kernel 3, stride 2,
  padding 1) centres output ``j`` on Mel frame ``2 j``. Encoder frame ``j`` is thus centred on
  sample ``320 j``: ``frame_stride_samples = 320``, ``first_frame_center_samples = 0``, and the conv
  receptive field is 5 Mel frames = ``4 * 160 + 400 = 1040`` samples (self-attention is global).
- Frame count: the frames whose centre lies inside the clip, ``ceil(num_samples / 320)``, i.e.
  ``ceil(num_samples / hop)`` Mel frames passed through the conv length formula
  ``floor((L + 2 p - k) / s) + 1``. This is the arithmetic of Hugging Face's own attention mask
  (``feature_extractor(..., return_attention_mask=True)`` then ``_get_feat_extract_output_lengths``).
  An empty clip has 0 frames; any non-empty clip has at least one.

Hidden states follow ``WhisperEncoder(input_features, output_hidden_states=True).hidden_states``:
``[embeddings (conv + positions), layer 1, ..., layer N-1, layer_norm(layer N)]`` — the final
``layer_norm`` is applied to the last entry only, as in Hugging Face.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featstore.encoders.base import Encoder

#: default upper bound on (clips x window positions) per forward pass: 16 full 30-s windows
DEFAULT_MAX_BATCH_POSITIONS = 24_000
#: the file beside a fine-tuned checkpoint's weights that records its window
RECORDED_WINDOW_FILE = "featstore_encoder.json"
#: ``context_seconds`` default: the window recorded in the checkpoint, else the full window
RECORDED = "recorded"


def write_recorded_window(directory: Path | str, context_seconds: float | None) -> Path:
    """Record the window a checkpoint was trained with (``None``: the full window) beside its weights."""
    path = Path(directory) / RECORDED_WINDOW_FILE
    path.write_text(json.dumps({"format": "featstore-encoder", "version": 1,
                                "whisper_context_seconds": context_seconds}, indent=2) + "\n")
    return path


def read_recorded_window(directory: Path | str) -> tuple[bool, float | None]:
    """``(True, seconds or None)`` when ``directory`` records a window, else ``(False, None)``."""
    path = Path(directory) / RECORDED_WINDOW_FILE
    if not path.is_file():
        return False, None
    try:
        data = json.loads(path.read_text())
        value = data["whisper_context_seconds"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a featstore window record ({type(exc).__name__}: {exc})") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{path}: whisper_context_seconds must be a number of seconds or null, got {value!r}")
    return True, value


class WhisperEncoder(Encoder):
    """The encoder half of a Whisper checkpoint (Hugging Face format) as a feature store encoder.

    Parameters
    ----------
    local_dir : directory with ``config.json``, weights and ``preprocessor_config.json``.
    name, revision : provenance (what was asked for; commit or content hash).
    device : torch device (``"cpu"``, ``"cuda"``...).
    context_seconds : ``None`` for the full 30-s window, else the shortened window length in seconds
        (a multiple of 0.02 s, at most the full window). Default: the window recorded in
        ``featstore_encoder.json`` beside the weights (a fine-tuned checkpoint), else the full window.
    max_batch_positions : clips are run in chunks of at most this many window positions, so a batch
        of many short clips does not allocate ``batch x 1500`` attention maps at once.
    """

    def __init__(
        self,
        local_dir: Path | str,
        name: str | None = None,
        revision: str = "",
        device: str = "cpu",
        context_seconds: float | None | str = RECORDED,
        max_batch_positions: int = DEFAULT_MAX_BATCH_POSITIONS,
    ) -> None:
        import torch
        from transformers import WhisperFeatureExtractor, WhisperModel

        local_dir = Path(local_dir)
        self.name = str(local_dir) if name is None else name
        self.revision = revision
        self.device = device
        if not (local_dir / "preprocessor_config.json").exists():
            raise ValueError(f"{local_dir} holds no preprocessor_config.json (the Whisper feature extractor)")
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(local_dir)
        window_source = None
        if isinstance(context_seconds, str) and context_seconds == RECORDED:
            recorded, context_seconds = read_recorded_window(local_dir)
            window_source = "checkpoint" if recorded else None
        model = WhisperModel.from_pretrained(local_dir, dtype=torch.float32)
        self.encoder = model.get_encoder().eval().to(device)
        del model
        fe, enc = self.feature_extractor, self.encoder
        self._hop, self._n_fft = int(fe.hop_length), int(fe.n_fft)
        self._convs = [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in (enc.conv1, enc.conv2)]

        self.sample_rate = int(fe.sampling_rate)
        conv_stride = math.prod(s for _, s, _ in self._convs)
        self.frame_stride_samples = self._hop * conv_stride
        rf_mel, jump, center = 1, 1, 0.0
        for k, s, p in self._convs:
            rf_mel += (k - 1) * jump
            center += jump * ((k - 1) / 2 - p)
            jump *= s
        self.receptive_field_samples = (rf_mel - 1) * self._hop + self._n_fft
        self.first_frame_center_samples = center * self._hop

        cfg = enc.config
        self.full_positions = int(cfg.max_source_positions)
        full_seconds = self.full_positions * self.frame_stride_samples / self.sample_rate
        if self.full_positions * self.frame_stride_samples != int(fe.n_samples):
            raise ValueError(
                f"model window ({self.full_positions} positions x {self.frame_stride_samples} samples) does not "
                f"match the feature extractor's {fe.n_samples} samples"
            )
        self.context_seconds = _check_context(context_seconds, full_seconds, self.frame_stride_samples / self.sample_rate)
        if self.context_seconds is None or self.context_seconds == full_seconds:
            self.positions = self.full_positions
            mode = "full-30s" if full_seconds == 30 else f"full-{full_seconds:g}s"
        else:
            self.positions = round(self.context_seconds * self.sample_rate / self.frame_stride_samples)
            mode = "context"
        if int(max_batch_positions) < 1:
            raise ValueError(f"max_batch_positions must be >= 1, got {max_batch_positions}")
        self.max_batch_positions = int(max_batch_positions)
        self.max_samples = self.positions * self.frame_stride_samples
        self.window_seconds = self.max_samples / self.sample_rate

        self.layer_dims = [int(cfg.d_model)] * (int(cfg.encoder_layers) + 1)
        self.padding_exact = True
        fe_dict = {k: v for k, v in fe.to_dict().items() if k != "mel_filters"}
        self.config = {
            **cfg.to_dict(),
            "feature_extractor": fe_dict,
            "window_mode": mode,
            "window_seconds": self.window_seconds,
            "context_seconds": self.context_seconds,
            "window_positions": self.positions,
        }
        self.extra_attrs = {
            "whisper_window_mode": mode,
            "whisper_window_seconds": self.window_seconds,
            "whisper_context_seconds": self.context_seconds,
        }
        if window_source:
            self.extra_attrs["whisper_window_source"] = window_source
        if float(fe.dither) != 0.0:
            # dithering would make features random; the store holds deterministic features
            self.extra_attrs["whisper_note"] = f"feature extractor dither={fe.dither} ignored (deterministic features)"
        self._mel_filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).to(device)
        self._window_fn = torch.hann_window(self._n_fft, device=device)
        #: encoder layers through :func:`_layer_fast` (False: the Hugging Face modules)
        self.fast_layers = True
        #: running totals of :meth:`encode`: clips, stored (clip) frames, window positions that were
        #: padding (computed but not stored) — Whisper's cost is per window, not per audio second
        self.stats = {"clips": 0, "frames": 0, "padded_frames": 0}

    # ------------------------------------------------------------------ geometry
    def num_frames(self, num_samples: int) -> int:
        """``ceil(num_samples / 320)``: the encoder frames whose centre lies inside the clip."""
        length = -(-int(num_samples) // self._hop) if num_samples > 0 else 0
        for k, s, p in self._convs:
            length = max(0, (length + 2 * p - k) // s + 1)
        return length

    # ------------------------------------------------------------------ encoding
    def encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Per clip, one ``(num_frames, d_model)`` float32 array per hidden state."""
        out = self._encode(clips, self.positions)
        frames = sum(len(o[0]) for o in out)
        self.stats["clips"] += len(out)
        self.stats["frames"] += frames
        self.stats["padded_frames"] += len(out) * self.positions - frames
        return out

    def _encode(self, clips: Sequence[np.ndarray], positions: int) -> list[list[np.ndarray]]:
        import torch

        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        limit = positions * self.frame_stride_samples
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise ValueError(f"clip {i}: expected a 1-D mono signal, got shape {c.shape}")
            if len(c) > limit:
                raise ValueError(
                    f"clip {i} has {len(c)} samples ({len(c) / self.sample_rate:.2f} s), longer than the Whisper "
                    f"window of {limit / self.sample_rate:g} s; "
                    + ("raise context_seconds or cut the clip" if positions < self.full_positions else "cut the clip")
                )
        chunk = max(1, self.max_batch_positions // positions)
        out: list[list[np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, len(clips), chunk):
                part = clips[start : start + chunk]
                counts = [self.num_frames(len(c)) for c in part]
                keep = max(counts, default=0)
                states = self.forward_hidden_states(self.log_mel(part, positions), keep)
                arrays = [s.float().cpu().numpy() for s in states]
                for b, n in enumerate(counts):
                    out.append([np.ascontiguousarray(a[b, :n]) for a in arrays])
        return out

    def log_mel(self, clips: Sequence[np.ndarray], positions: int | None = None):
        """Log-Mel input of shape ``(batch, n_mels, 2 * positions)`` as a torch tensor on the device.

        Equal to the first ``2 * positions`` frames of ``WhisperFeatureExtractor`` applied to the clip
        (zero-padded to 30 s), computed over a shortened signal when the window is shorter: Mel
        frames beyond it that touch no clip sample hold only zeros, whose log is ``log10(1e-10)``,
        so the 30-s window's maximum is known without computing them.
        """
        import torch

        positions = self.positions if positions is None else positions
        hop, n_fft = self._hop, self._n_fft
        n_mel = positions * math.prod(s for _, s, _ in self._convs)
        full = self.full_positions * self.frame_stride_samples
        # enough signal that every Mel frame touching a clip sample is computed without end effects
        length = min(full, n_mel * hop + n_fft + 2 * hop)
        wave = np.zeros((len(clips), length), dtype=np.float32)
        for i, c in enumerate(clips):
            wave[i, : len(c)] = c
        wave_t = torch.from_numpy(wave).to(self.device)
        stft = torch.stft(wave_t, n_fft, hop, window=self._window_fn, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self._mel_filters.T @ power, min=1e-10).log10()
        if length < full:
            valid = (length - n_fft // 2) // hop + 1  # frames whose STFT window ends inside the signal
            silence = torch.tensor(1e-10, dtype=torch.float32, device=self.device).log10()
            top = torch.maximum(log_spec[..., :valid].amax(dim=(1, 2), keepdim=True), silence)
        else:
            top = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, top - 8.0)
        return ((log_spec + 4.0) / 4.0)[..., :n_mel]

    # ------------------------------------------------------------------ the padded recipe
    #: Whisper's encoder takes no attention mask (Hugging Face's ignores one), so neither does the recipe
    padded_attention_mask = False

    def padded_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                        keep_padding: bool = False) -> list[list[np.ndarray]]:
        """What the usual Whisper recipe computes when every clip is first padded or cut to
        ``pad_seconds`` (``featstore extract --emulate-padding``).

        "Usual" here: the clip is cut to its first ``pad_seconds`` and zero-padded to that length,
        then given to Whisper as Whisper takes every input, zero-padded to its window (30 s, or the
        store's ``context_seconds`` window) — the encoder cannot run on anything else. Returns each
        clip's true frames (those whose centre lies inside the clip as cut), or with
        ``keep_padding`` the ``num_frames(pad_seconds)`` frames that cover the padded clip (50 per
        second), which is what a pipeline that pools the padded clip's frames reads. For a clip no
        longer than ``pad_seconds`` the true frames are those of an exact run: zero padding inside
        Whisper's own window changes nothing; only cutting and pooling over the padding do.
        """
        n_pad = int(round(float(pad_seconds) * self.sample_rate))
        if not 0 < n_pad <= self.max_samples:
            raise ValueError(f"--emulate-padding {pad_seconds:g} s does not fit this Whisper window "
                             f"({self.window_seconds:g} s)")
        cut = [np.asarray(c, dtype=np.float32)[:n_pad] for c in clips]
        out = self._encode([np.pad(c, (0, n_pad - len(c))) for c in cut], self.positions)
        true = [self.num_frames(len(c)) for c in cut]
        if not keep_padding:
            out = [[np.ascontiguousarray(a[:t]) for a in o] for o, t in zip(out, true)]
        self.stats["clips"] += len(out)
        self.stats["frames"] += sum(true)
        self.stats["padded_frames"] += len(out) * self.positions - sum(true)
        return out

    # ------------------------------------------------------------------ differentiable forward
    def forward_hidden_states(self, mel, keep: int | None = None) -> list:
        """All hidden states of a batch of windows, each cut to its first ``keep`` frames.

        ``mel``: :meth:`log_mel` of the batch, ``(batch, n_mels, 2 * positions)``. Same modules and
        order as ``transformers``' ``WhisperEncoder.forward``, with the positional embeddings sliced
        to the window length. Every clip has its own window, so a batch never mixes clips. No
        ``torch.no_grad`` here: gradients reach every parameter that requires them (fine-tuning);
        extraction calls it under ``torch.inference_mode()``. Only the first
        :meth:`num_frames` frames of a clip cover it; the rest is the window's padding.
        """
        x = self.embed(mel)
        return [x[:, :keep]] + self.run_layers(x, 0, keep=keep)

    def embed(self, mel):
        """``hidden_states[0]`` over the whole window: conv stem, GELUs and positional embeddings."""
        import torch
        import torch.nn.functional as F

        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        # contiguous (B, T, D): the sum would keep the permuted layout, and every later linear
        # layer and residual sum would copy it again
        return torch.add(x.contiguous(), enc.embed_positions.weight[: x.shape[1]])

    def run_layers(self, x, start: int, end: int | None = None, keep: int | None = None) -> list:
        """Run encoder layers ``start .. end - 1`` on ``x`` = ``hidden_states[start]`` (whole window).

        Returns ``hidden_states[start + 1 .. end]`` (``end`` defaults to the last layer, whose output
        gets the final layer norm, as in Hugging Face), each cut to its first ``keep`` frames
        (``None``: the whole window, e.g. to cache a frozen prefix and continue from it).
        """
        enc = self.encoder
        n = len(enc.layers)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"layers {start}..{end} outside 0..{n}")
        states = []
        for i in range(start, end):
            layer = enc.layers[i]
            fast = self.fast_layers and _fast_layer_ok(layer)
            if i == n - 1:  # only the kept frames of the last layer are returned: only their queries
                x = _layer_fast(layer, x, keep, owner=enc) if fast else layer(x, None)
                states.append(enc.layer_norm(x[:, :keep]))
            else:
                x = _layer_fast(layer, x, owner=enc) if fast else layer(x, None)
                states.append(x[:, :keep])
        return states

    # ------------------------------------------------------------------ audit
    def padding_audit(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                      frames: Sequence[Sequence[np.ndarray]] | None = None) -> dict[str, Any]:
        """How far the shortened window moves the clip's frames, per layer, vs the full 30-s run.

        Returns ``{"reference": "full-30s", "context_seconds", "clips", "frames", "max_abs",
        "mean_abs", "mean_cosine"}`` (lists per layer; cosine averaged over frames), or ``{}`` in
        full-window mode: there the 30-s zero padding *is* Whisper's input, and zero-padding a clip
        to ``pad_seconds`` first changes nothing (the padded clip has the same 30-s window).
        """
        if self.positions == self.full_positions:
            return {}
        keep = [i for i, c in enumerate(clips) if 0 < len(c) <= self.max_samples]
        clips = [clips[i] for i in keep]
        if not clips:
            return {}
        ctx = [frames[i] for i in keep] if frames is not None else self._encode(clips, self.positions)
        ref = self._encode(clips, self.full_positions)
        max_abs, mean_abs, cosine = [], [], []
        for k in range(self.num_layers):
            a = np.concatenate([c[k] for c in ctx]).astype(np.float64)
            b = np.concatenate([r[k] for r in ref]).astype(np.float64)
            diff = np.abs(a - b)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            max_abs.append(float(diff.max()))
            mean_abs.append(float(diff.mean()))
            cosine.append(float(cos.mean()))
        return {
            "reference": "full-30s",
            "context_seconds": self.context_seconds,
            "clips": len(clips),
            "frames": int(sum(len(c[0]) for c in ctx)),
            "max_abs": max_abs,
            "mean_abs": mean_abs,
            "mean_cosine": cosine,
        }


def _fast_layer_ok(layer) -> bool:
    """Whether ``layer`` is transformers' ``WhisperEncoderLayer`` as :func:`_layer_fast` knows it."""
    attn = getattr(layer, "self_attn", None)
    return (type(layer).__name__ == "WhisperEncoderLayer" and attn is not None
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "scaling", "num_heads"))
            and all(hasattr(layer, a) for a in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "activation_fn")))


def _layer_fast(layer, x, keep: int | None = None, owner=None):
    """``WhisperEncoderLayer.forward(x, None)`` with the outputs of the first ``keep`` positions only
    (all when ``None``): keys and values from the whole window, queries, output projection and MLP
    for the kept rows (row-wise the same sums). q/k/v go to ``scaled_dot_product_attention`` as
    strided views, without the contiguous copies of the Hugging Face module. ``owner``: a module
    that keeps reusable buffers (:func:`_layer_inference` then runs where no autograd records)."""
    import torch
    import torch.nn.functional as F

    from featstore.encoders.ssl_native import scratch_ok

    attn = layer.self_attn
    bsz, t, e = x.shape
    h_, d = attn.num_heads, e // attn.num_heads
    tq = t if keep is None else min(int(keep), t)
    dropout = layer.training and (layer.dropout or layer.activation_dropout or attn.dropout)
    if owner is not None and scratch_ok(x) and not dropout:
        return _layer_inference(layer, x, tq, owner)
    h = layer.self_attn_layer_norm(x)
    hq = h if tq == t else h[:, :tq]
    q = (attn.q_proj(hq) * attn.scaling).view(bsz, tq, h_, d).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, t, h_, d).transpose(1, 2)
    v = attn.v_proj(h).view(bsz, t, h_, d).transpose(1, 2)
    drop = attn.dropout if attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=1.0)
    o = attn.out_proj(o.transpose(1, 2).reshape(bsz, tq, e))
    x = x[:, :tq] + F.dropout(o, p=layer.dropout, training=layer.training)
    y = layer.activation_fn(layer.fc1(layer.final_layer_norm(x)))
    y = F.dropout(y, p=layer.activation_dropout, training=layer.training)
    x = x + F.dropout(layer.fc2(y), p=layer.dropout, training=layer.training)
    if x.dtype == torch.float16:
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


def _layer_inference(layer, x, tq: int, owner):
    """:func:`_layer_fast` for extraction (float32 on the CPU, no autograd): q, k and v as one
    product, every product written into buffers kept on ``owner`` and reused (no fresh ~100-MB
    tensors to page-fault), biases and the GELU applied in place; q scaled before the attention
    kernel as the module does (passing the scale to the kernel instead moved frames by ~1e-5
    relative on large weights). Bit-identical to the module on the test models."""
    import torch
    import torch.nn.functional as F

    from featstore.encoders.ssl_native import _cached, _linear_into, scratch

    attn = layer.self_attn
    bsz, t, e = x.shape
    h_, d = attn.num_heads, e // attn.num_heads
    h = layer.self_attn_layer_norm(x).view(-1, e)
    bias_k = attn.k_proj.bias
    w = _cached(attn, "qkv_w", lambda: torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    b = _cached(attn, "qkv_b", lambda: torch.cat([attn.q_proj.bias,
                                                  torch.zeros_like(attn.q_proj.bias) if bias_k is None else bias_k,
                                                  attn.v_proj.bias]),
                *(p for p in (attn.q_proj.bias, bias_k, attn.v_proj.bias) if p is not None))
    qkv = _linear_into(owner, "qkv", h, weight=w, bias=b).view(bsz, t, 3, h_, d)
    q = qkv[:, :tq, 0].transpose(1, 2) * attn.scaling
    k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, tq, d)
    ctx = scratch(owner, "ctx", bsz * tq, e, x)
    ctx.view(bsz, tq, h_, d).copy_(o.transpose(1, 2))
    x = x[:, :tq] + _linear_into(owner, "out", ctx, attn.out_proj).view(bsz, tq, e)
    y = _linear_into(owner, "fc1", layer.final_layer_norm(x).view(-1, e), layer.fc1)
    if _exact_gelu(layer.activation_fn):
        torch._C._nn.gelu_(y)
    else:
        y = layer.activation_fn(y)
    return x + _linear_into(owner, "fc2", y, layer.fc2).view(bsz, tq, e)


def _exact_gelu(fn) -> bool:
    import torch.nn.functional as F

    return type(fn).__name__ == "GELUActivation" and getattr(fn, "act", None) is F.gelu


def _check_context(value: float | None, full_seconds: float, step: float) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"context_seconds must be a number of seconds, got {value!r}") from None
    if not (0 < seconds <= full_seconds):
        raise ValueError(f"context_seconds must be in (0, {full_seconds:g}], got {value!r}")
    positions = round(seconds / step)
    if positions < 1 or abs(positions * step - seconds) > 1e-6:
        raise ValueError(f"context_seconds must be a multiple of {step:g} s (one encoder frame), got {value!r}")
    return round(positions * step, 6)

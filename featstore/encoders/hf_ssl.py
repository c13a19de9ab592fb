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

import atexit
import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featstore.encoders.base import Encoder
from featstore.encoders.ssl_native import (NativeUnsupported, RecipeInputs, _cached, _pos_conv_cropped, load_native,
                                           packed_forward, scratch, scratch_ok, unsupported_reason)


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


_LANE_POOL: list[tuple[int, ThreadPoolExecutor]] = []  # (workers, the one pool), grown when a batch needs more lanes
_LANE_POOL_LOCK = threading.Lock()


def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """The process's one persistent pool of worker threads for :meth:`SSLEncoder._packed_lanes`,
    with at least ``lanes`` workers (persistent: their :func:`~featstore.encoders.ssl_native.scratch`
    buffers, kept per thread, are reused from batch to batch). When a batch needs more lanes than
    it has, it is replaced by a larger one (its threads end first; the new threads' first scratch
    calls drop the ended threads' buffers): the process never holds more lane threads than the
    most lanes one batch used."""
    with _LANE_POOL_LOCK:
        if _LANE_POOL and _LANE_POOL[0][0] >= lanes:
            return _LANE_POOL[0][1]
        if _LANE_POOL:  # idle between batches: its threads end here, before the new ones start
            _LANE_POOL.pop()[1].shutdown(wait=True)
        _LANE_POOL.append((lanes, ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="featstore-lane")))
        return _LANE_POOL[0][1]


def _end_lane_pool() -> None:
    """At exit: end the idle lane threads (a console script's fast exit waits for none)."""
    with _LANE_POOL_LOCK:
        while _LANE_POOL:
            _LANE_POOL.pop()[1].shutdown(wait=True)


atexit.register(_end_lane_pool)


def gemm_cnn_supported(feature_encoder: nn.Module) -> bool:
    """Whether :func:`gemm_cnn` handles this CNN: plain ``Conv1d`` layers (no padding, dilation or
    groups) each followed by nothing, a per-channel-over-time GroupNorm (first layer only, the
    wav2vec2 group-norm layout) or a LayerNorm over channels, then the activation."""
    layers = list(getattr(feature_encoder, "conv_layers", []))
    if not layers:
        return False
    for i, m in enumerate(layers):
        conv = getattr(m, "conv", None)
        if not isinstance(conv, nn.Conv1d) or not hasattr(m, "activation"):
            return False
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1 or conv.padding_mode != "zeros":
            return False
        norm = getattr(m, "layer_norm", None)
        if norm is None:
            continue
        if isinstance(norm, nn.GroupNorm):
            if i != 0 or norm.num_groups != norm.num_channels:
                return False
        elif not (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (conv.out_channels,)):
            return False
    return True


def _gemm_weight(conv: nn.Conv1d) -> torch.Tensor:
    """``conv.weight`` ``(out, in, k)`` as the ``(k * in, out)`` matrix that multiplies a window of
    ``k`` channels-last input rows laid end to end (frozen weights: built once, :func:`_cached`)."""
    w = conv.weight
    return _cached(conv, "gemm_w", lambda: w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous(), w)


def _strided_conv_gemm(x: torch.Tensor, rows: int, k: int, s: int, wmat: torch.Tensor,
                       bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A stride-``s``, kernel-``k`` convolution over channels-last rows ``x`` ``(N, C)`` as matrix
    products without im2col copies: output row ``r`` reads input rows ``s r .. s r + k - 1``, split
    into ``ceil(k / s)`` groups of at most ``s`` consecutive rows; each group over all ``r`` is a
    strided view ``(rows, <= s C)`` with row stride ``s C``, which BLAS reads in place. ``out``: a
    ``(rows, C_out)`` buffer to write into (no autograd)."""
    c = x.shape[1]
    x = x.contiguous()
    first = True
    for j0 in range(0, k, s):
        width = min(s, k - j0) * c
        view = x.as_strided((rows, width), (s * c, 1), x.storage_offset() + j0 * c)
        w = wmat[j0 * c : j0 * c + width]
        if first:
            first = False
            if out is not None:  # the product, then the bias in place (cheaper than addmm's bias pass)
                torch.mm(view, w, out=out)
                if bias is not None:
                    out.add_(bias)
            else:
                out = torch.addmm(bias, view, w) if bias is not None else view @ w
        elif (torch.is_grad_enabled() and (out.requires_grad or view.requires_grad or w.requires_grad)) \
                or not out.dtype == view.dtype == w.dtype:  # autocast: products are cast, in-place ops are not
            out = out + view @ w
        else:
            out.addmm_(view, w)
    return out


def _activation(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``act(h)``, in place for the exact GELU when no gradient is recorded (one pass less over the
    largest tensors of the CNN)."""
    exact_gelu = ((type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu)
                  or (type(act) is nn.GELU and act.approximate == "none"))
    if exact_gelu and not (torch.is_grad_enabled() and h.requires_grad):
        return torch._C._nn.gelu_(h)
    return act(h)


def conv_geometry(convs: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(receptive_field, total_stride)`` in samples of a stack of ``(kernel, stride)`` convolutions."""
    rf, jump = 1, 1
    for k, s in convs:
        rf += (k - 1) * jump
        jump *= s
    return rf, jump


def conv_frames(convs: Sequence[tuple[int, int]], num_samples: int) -> int:
    """Frames of ``num_samples`` samples: the conv formula ``(n - k) // s + 1`` per layer (0 below one frame)."""
    n = int(num_samples)
    for k, s in convs:
        n = (n - k) // s + 1
        if n <= 0:
            return 0
    return n


def cnn_slots(layers: Sequence[nn.Module], lengths: Sequence[int], tails: Sequence[int] | None = None
              ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Where :func:`gemm_cnn` lays each clip: ``(offsets, slots, frames, computed)``, in samples and
    frames.

    A clip's frames read only its first ``(frames - 1) * stride + receptive_field`` samples (the
    rest of a short clip, up to a stride's worth, feeds no frame); its slot is that span rounded up
    to the total stride, so every clip starts on a whole row of every layer, and the slots lie end
    to end (a clip without frames gets none). Rows a layer computes past a clip's last useful one
    read the next slot: they are scratch, never returned. ``tails``: where each clip's constant
    tail starts (the sample from which all are equal: a padded window's zeros). Every frame whose
    samples all lie in it is the same (each layer maps equal rows to equal rows), so only the
    first of them is computed (``computed`` frames: the slot covers those) and repeated."""
    convs = [(m.conv.kernel_size[0], m.conv.stride[0]) for m in layers]
    rf, total_stride = conv_geometry(convs)
    frames = [conv_frames(convs, n) for n in lengths]
    computed = list(frames) if tails is None else [
        min(f, -(-int(t) // total_stride) + 1) for f, t in zip(frames, tails)]
    slots = [-(-((f - 1) * total_stride + rf) // total_stride) * total_stride if f > 0 else 0 for f in computed]
    offsets = [0] * len(slots)
    for b in range(1, len(slots)):
        offsets[b] = offsets[b - 1] + slots[b - 1]
    return offsets, slots, frames, computed


def constant_tail(wave: torch.Tensor) -> int:
    """The first sample of ``wave``'s constant tail: from there to the end all samples are equal
    (``len(wave) - 1`` for a wave that ends in two different samples; 0 for a constant one)."""
    differs = wave.detach() != wave[-1].detach()
    if not bool(differs.any()):
        return 0
    return len(wave) - int(differs.flip(0).to(torch.uint8).argmax())


def gemm_cnn(feature_encoder: nn.Module, waves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The CNN feature encoder as matrix products, exact per clip: each clip's frames ``(C, n)``.

    Channels-last throughout: the clips are packed end to end, each in a slot of the samples its
    frames read rounded up to the total stride (:func:`cnn_slots`; of a constant tail, as a padded
    window's, only the first frame is computed, then repeated), so every layer is one
    ``(rows, k * C_in) @ (k * C_in, C_out)`` product over a strided view of the previous layer's
    rows (im2col without a copy where ``k <= stride``), and a clip's valid outputs read only its own
    samples. The first layer's GroupNorm (one group per channel: each channel normalised over the
    clip's time, all its samples) is folded into that layer's weights per clip: the conv output's
    per-channel mean and variance over the clip's valid frames follow from the mean and covariance
    of its raw-sample windows (float64), so the layer is a product per clip with its own weights.
    Equal to :func:`masked_group_norm_cnn` and to each clip run alone to ~1e-6. Returns the frames
    as views (``(C, n)``, transposed) and the counts.
    """
    layers = list(feature_encoder.conv_layers)
    device, dtype = waves[0].device, waves[0].dtype
    lengths = [int(len(w)) for w in waves]
    offsets, slots, counts, computed = cnn_slots(layers, lengths, [constant_tail(w) if len(w) else 0 for w in waves])
    total = offsets[-1] + slots[-1]
    first = layers[0].conv
    k0, s0, c0 = first.kernel_size[0], first.stride[0], first.out_channels
    flat = torch.zeros(total + k0 + s0, dtype=dtype, device=device)
    for w, off, slot in zip(waves, offsets, slots):
        flat[off : off + min(len(w), slot)] = w[:slot]
    reuse = scratch_ok(flat)
    rows = total // s0
    norm = getattr(layers[0], "layer_norm", None)
    live = [b for b, slot in enumerate(slots) if slot]
    if isinstance(norm, nn.GroupNorm) and live:
        weff, shift = _group_norm_fold([waves[b] for b in live], first, norm)
        buf = scratch(feature_encoder, "cnn0", rows, c0, flat) if reuse and len(layers) > 1 else None
        parts = []
        for j, b in enumerate(live):
            r0, r1 = offsets[b] // s0, (offsets[b] + slots[b]) // s0
            view = flat.as_strided((r1 - r0, k0), (s0, 1), offsets[b])
            if buf is not None:  # the product into the buffer, then the shift in place
                torch.mm(view, weff[j], out=buf[r0:r1]).add_(shift[j])
            else:
                parts.append(torch.addmm(shift[j], view, weff[j]))
        h = buf if buf is not None else torch.cat(parts)
    else:
        h = flat.as_strided((rows, k0), (s0, 1)).contiguous() @ first.weight.reshape(c0, k0).t()
        if first.bias is not None:
            h = h + first.bias
    stride = s0
    for i, layer in enumerate(layers):
        if i:
            conv = layer.conv
            k, s = conv.kernel_size[0], conv.stride[0]
            stride *= s
            # rows past the end of the last slot's scratch are not computed (never valid)
            rows = min(total // stride, (h.shape[0] - k) // s + 1)
            # intermediate layers write into reused buffers (ping-pong); the last one, whose rows
            # are returned, into fresh memory
            buf = (scratch(feature_encoder, f"cnn{i % 2}", rows, conv.out_channels, h)
                   if reuse and i < len(layers) - 1 else None)
            h = _strided_conv_gemm(h, rows, k, s, _gemm_weight(conv), conv.bias, out=buf)
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, nn.LayerNorm):
            h = nn.functional.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = _activation(layer.activation, h)
    out = []
    for off, n, c in zip(offsets, counts, computed):
        rows = h[off // stride : off // stride + c]
        if c < n:  # the frames of the constant tail: all equal to its first
            rows = torch.cat([rows, rows[-1:].expand(n - c, -1)])
        out.append(rows.t())
    return out, counts


def _group_norm_fold(waves: Sequence[torch.Tensor], conv: nn.Conv1d, gn: nn.GroupNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """conv -> GroupNorm(channels) of the first layer as per-clip weights: ``(B, k, C)`` and shifts ``(B, C)``.

    For clip ``b`` with valid windows ``x_t`` (all its ``(n - k) // s + 1`` windows), channel ``c``'s
    conv output is ``w_c . x_t + bias_c``: its mean over the clip is ``w_c . mu_b + bias_c`` and its
    (biased) variance ``w_c^T S_b w_c``, with ``mu_b``, ``S_b`` the windows' mean and covariance
    (float64, centred: no cancellation). The normalised output is then
    ``x_t . (w_c a_bc) + (beta_c - a_bc w_c . mu_b)`` with ``a_bc = gamma_c / sqrt(var_bc + eps)``.
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    counts = [max(0, (len(w) - k) // s + 1) for w in waves]
    rows = max(counts)
    pitch = (rows - 1) * s + k
    flat = torch.zeros(len(waves) * pitch, dtype=torch.float64, device=waves[0].device)
    for b, w in enumerate(waves):
        flat[b * pitch : b * pitch + min(len(w), pitch)] = w[:pitch]
    patches = flat.as_strided((len(waves), rows, k), (pitch, s, 1))  # (B, rows, k)
    n = torch.tensor(counts, device=flat.device, dtype=torch.float64)
    valid = (torch.arange(rows, device=flat.device)[None] < n[:, None]).to(torch.float64)[..., None]
    cnt = n.clamp(min=1)[:, None]
    mu = (patches * valid).sum(1) / cnt  # (B, k)
    dev = (patches - mu[:, None]) * valid
    cov = dev.transpose(1, 2) @ dev / cnt[..., None]  # (B, k, k)
    w64 = conv.weight.reshape(conv.out_channels, k).double()
    var = torch.einsum("ck,bkl,cl->bc", w64, cov, w64)  # (B, C)
    scale = torch.rsqrt(var + gn.eps)
    if gn.affine:
        scale = scale * gn.weight.double()[None]
    shift = -(mu @ w64.t()) * scale  # (B, C); the conv bias moves the mean only: it cancels
    if gn.affine:
        shift = shift + gn.bias.double()[None]
    weff = (w64[None] * scale[..., None]).transpose(1, 2)  # (B, k, C)
    return weff.to(waves[0].dtype), shift.to(waves[0].dtype)


def pos_conv_croppable(module: nn.Module) -> bool:
    """Whether ``module`` is the wav2vec2 / HuBERT / WavLM positional embedding: one ``Conv1d``
    (zero "same" padding), the pad-removal layer and the activation, nothing else."""
    conv = getattr(module, "conv", None)
    return (isinstance(conv, nn.Conv1d) and hasattr(module, "padding") and hasattr(module, "activation")
            and getattr(module, "batch_norm", None) is None and conv.stride == (1,) and conv.dilation == (1,)
            and conv.padding_mode == "zeros" and conv.padding[0] == conv.kernel_size[0] // 2
            and type(module).forward.__qualname__.endswith("PositionalConvEmbedding.forward"))


def wavlm_attention_fast(attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_bias: torch.Tensor | None = None, index: int = 0, **kwargs: Any):
    """``WavLMAttention.forward`` (gated relative-position bias, key padding mask) with one fused
    q/k/v product and ``scaled_dot_product_attention`` instead of ``multi_head_attention_forward``,
    which also forms and head-averages the attention weights that extraction never reads. The
    ungated bias is passed on as ``(1, heads, T, T)`` (HF: repeated per clip). Returns
    ``(output, None, position_bias)`` as the module does."""
    bsz, t, e = hidden_states.shape
    h, d = attn.num_heads, attn.head_dim
    if position_bias is None:
        position_bias = attn.compute_bias(t, t)[None]  # (1, H, T, T)
    elif position_bias.dim() == 3:  # HF's (B * H, T, T) layout
        position_bias = position_bias.view(-1, h, t, t)[:1]
    rel = attn.gru_rel_pos_linear(hidden_states.view(bsz, t, h, d))  # (B, T, H, 8)
    gate_a, gate_b = torch.sigmoid(rel.view(bsz, t, h, 2, 4).sum(-1)).chunk(2, dim=-1)  # (B, T, H, 1)
    gate = (gate_a * (gate_b * attn.gru_rel_pos_const.view(1, 1, h, 1) - 1.0) + 2.0).permute(0, 2, 1, 3)
    bias = gate * position_bias  # (B, H, T, T)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    w = _cached(attn, "qkv_w", lambda: torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    b = _cached(attn, "qkv_b", lambda: torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
    q, k, v = nn.functional.linear(hidden_states, w, b).view(bsz, t, 3, h, d).permute(2, 0, 3, 1, 4)
    drop = attn.dropout if attn.training else 0.0
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
    out = attn.out_proj(out.transpose(1, 2).reshape(bsz, t, e))
    return out, None, position_bias


def wavlm_attention_swappable(attn: nn.Module) -> bool:
    """Whether ``attn`` is transformers' ``WavLMAttention`` as :func:`wavlm_attention_fast` knows it."""
    return (type(attn).__name__ == "WavLMAttention" and type(attn).forward.__module__.endswith("modeling_wavlm")
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "gru_rel_pos_linear",
                                               "gru_rel_pos_const", "compute_bias"))
            and attn.gru_rel_pos_linear.out_features == 8)


@contextmanager
def fast_transformer(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While active, the model's positional convolution runs cropped (:func:`_pos_conv_cropped`)
    and WavLM's attention through :func:`wavlm_attention_fast`; everything else is the model's own
    forward. Modules of another layout are left as they are."""
    swapped: list[nn.Module] = []
    try:
        if enabled:
            enc = getattr(model, "encoder", None)
            pos = getattr(enc, "pos_conv_embed", None)
            if pos is not None and pos_conv_croppable(pos):
                pos.forward = lambda hs, _m=pos: _pos_conv_cropped(_m, hs)
                swapped.append(pos)
            for layer in getattr(enc, "layers", []):
                a = getattr(layer, "attention", None)
                if a is not None and wavlm_attention_swappable(a):
                    a.forward = lambda *args, _m=a, **kw: wavlm_attention_fast(_m, *args, **kw)
                    swapped.append(a)
        yield
    finally:
        for m in swapped:
            del m.forward


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
        local_dir = Path(local_dir)
        self.name = name or str(local_dir)
        self.revision = revision
        self.device = device
        self.local_dir = local_dir
        raw = json.loads((local_dir / "config.json").read_text())
        self._model = None
        self._feature_extractor = None
        # extraction runs without transformers where this layout is a known one (ssl_native);
        # transformers' model is loaded when something asks for it (fine-tuning, data2vec-audio, ...)
        self.native_note = unsupported_reason(raw) or ""
        self._net = None
        # the packed forward (ssl_native.packed_forward) runs on any model of a known layout: the
        # native modules, or transformers' model when that was loaded (sharded weights, fine-tuning)
        self.packed = not self.native_note
        if not self.native_note:
            try:
                self._net = load_native(raw, local_dir, device)
            except NativeUnsupported as exc:
                self.native_note = str(exc)
        cfg = raw if self._net is not None else self.model.config.to_dict()
        self.recipe, fe_note = RecipeInputs.from_dir(local_dir)
        self.do_normalize = self.recipe.do_normalize
        self.sample_rate = self.recipe.sampling_rate
        self.group_norm_cnn = cfg.get("feat_extract_norm", "group") != "layer"
        # group-norm CNNs run batched with a masked norm when their layout is the known one,
        # otherwise one clip at a time
        self.cnn_per_clip = self.group_norm_cnn and not group_norm_batchable(self._net.feature_extractor)
        # the CNN as matrix products (gemm_cnn) where its layout is a known one; else torch's Conv1d
        self.cnn_gemm = gemm_cnn_supported(self._net.feature_extractor)
        # cropped positional convolution and WavLM's attention without weights (fast_transformer)
        self.transformer_fast = True
        # data2vec-audio's positional embedding is a stack of convolutions: values at masked
        # positions leak into real frames after the first one, so it only batches clips of equal
        # frame count (no mask needed at all then).
        self.mask_exact = cfg.get("model_type") != "data2vec-audio"
        kernels, strides = list(cfg["conv_kernel"]), list(cfg["conv_stride"])
        self._convs = [(int(k), int(s)) for k, s in zip(kernels, strides)]
        rf, jump = conv_geometry(self._convs)
        self.frame_stride_samples = jump
        self.receptive_field_samples = rf
        self.first_frame_center_samples = (rf - 1) / 2
        n_hidden = int(cfg["num_hidden_layers"]) + 1
        self.layer_ids = list(range(n_hidden)) if layers is None else sorted(set(int(k) for k in layers))
        if any(k < 0 or k >= n_hidden for k in self.layer_ids):
            raise ValueError(f"layers must lie in 0..{n_hidden - 1} for this model")
        self.layer_dims = [int(cfg["hidden_size"])] * len(self.layer_ids)
        self.padding_exact = True
        self.amp = amp
        self.config = raw  # config.json as the checkpoint ships it
        self.extra_attrs: dict[str, Any] = {
            "feature_extractor_config": json.dumps(self.recipe.to_dict(), sort_keys=True, default=str),
            "cnn_mode": ("per-clip" if self.cnn_per_clip else
                         "batched, masked group norm" if self.group_norm_cnn else "batched"),
            "transformer_batching": "masked" if self.mask_exact else "equal-length",
            # how the CNN is computed (the values agree to ~1e-6, not bit for bit)
            "cnn_kernel": "gemm" if self.cnn_gemm else "conv1d",
            # how the transformer is computed: packed true frames (ssl_native) or transformers' forward
            # with a frame mask (the values agree to ~1e-5, not bit for bit)
            "transformer_kernel": "packed" if self.packed else "transformers",
            "do_normalize": self.do_normalize,
        }
        if fe_note:
            self.extra_attrs["encoder_note"] = fe_note
        self.stats = {"frames": 0, "padded_frames": 0, "batches": 0, "cnn_seconds": 0.0, "transformer_seconds": 0.0}

    # ------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """transformers' model of this checkpoint (``AutoModel``, float32, eval), loaded on first use;
        from then on extraction runs on its modules too (shared weights: a fine-tuned model's edits
        are what :meth:`encode` sees)."""
        if self._model is None:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.model = AutoModel.from_pretrained(str(self.local_dir), dtype=torch.float32).to(self.device).eval()
        return self._model

    @model.setter
    def model(self, module: nn.Module) -> None:
        self._model = module
        self._net = module

    @property
    def feature_extractor(self):
        """transformers' feature extractor of this checkpoint (loaded on first use; what fine-tuning
        saves beside its weights). Extraction reads the same file itself (:attr:`recipe`)."""
        if self._feature_extractor is None:
            from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor

            if (self.local_dir / "preprocessor_config.json").exists():
                self._feature_extractor = AutoFeatureExtractor.from_pretrained(str(self.local_dir))
            else:
                self._feature_extractor = Wav2Vec2FeatureExtractor()
        return self._feature_extractor

    @property
    def padded_attention_mask(self) -> bool:
        """Whether the common recipe passes an attention mask (the checkpoint's feature extractor returns one)."""
        return self.recipe.return_attention_mask

    def num_frames(self, num_samples: int) -> int:
        """Frames of ``num_samples`` samples: the conv formula ``(n - k) // s + 1`` per layer (0 below one frame)."""
        return conv_frames(self._convs, num_samples)

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
    #: samples per :func:`gemm_cnn` call (its matrix products want many rows; ~10 s of audio keeps
    #: the largest intermediate, the first layer's output, near 100 MB)
    cnn_gemm_samples = 160_000

    def cnn_outputs(self, waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each preprocessed wave's CNN frames ``(C, num_frames)``, as if run alone.

        Runs in chunks of :attr:`cnn_chunk` clips (one at a time for an unknown group-norm layout);
        gradients flow where autograd is on (fine-tuning the CNN).
        """
        fe = self._net.feature_extractor
        out: list[torch.Tensor] = []
        if self.cnn_gemm:
            a = 0
            while a < len(waves):  # chunks of at most cnn_gemm_samples samples (or one clip)
                b, size = a + 1, len(waves[a])
                while b < len(waves) and size + len(waves[b]) <= self.cnn_gemm_samples:
                    size += len(waves[b])
                    b += 1
                out += gemm_cnn(fe, waves[a:b])[0]
                a = b
            return out
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
        if any(f.requires_grad for f in feats):
            full = torch.stack([nn.functional.pad(f, (0, t_max - t)) for f, t in zip(feats, lengths)])
        else:  # channels-last, as the model transposes it next (no copy there)
            rows = feats[0].new_zeros(len(feats), t_max, feats[0].shape[0])
            for i, f in enumerate(feats):
                rows[i, : f.shape[-1]] = f.t()
            full = rows.transpose(1, 2)
        samples = torch.tensor([len(w) for w in waves], device=self.device)
        mask = (torch.arange(int(samples.max()), device=self.device)[None] < samples[:, None]).long()
        dummy = torch.zeros(len(waves), 1, device=self.device)
        with _feature_encoder_swapped(self.model, full), fast_transformer(self.model, self.transformer_fast), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            out = self.model(dummy, attention_mask=mask, output_hidden_states=True)
        return list(out.hidden_states), lengths

    @torch.inference_mode()
    def hidden_states(self, clips: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list[int]]:
        """All ``hidden_states`` of a batch, ``[(B, T_max, D)] * (layers+1)``, and true lengths."""
        waves = [torch.from_numpy(self.preprocess(c)).to(self.device) for c in clips]
        with self._autocast():
            t0 = time.perf_counter()
            feats = self.cnn_outputs(waves)
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            hidden, lengths = self.forward_hidden_states(waves, feats)
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        self.stats["cnn_seconds"] += t1 - t0
        self.stats["transformer_seconds"] += time.perf_counter() - t1
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

    #: CPU lanes per batch (``None``: one per torch thread; ``1``: off); see :meth:`_lane_parts`
    cpu_lanes: int | None = None
    #: audio seconds a lane must get at least (smaller batches run as one lane)
    lane_min_seconds = 2.0
    #: the most a lane may hold above an equal share of the batch's samples (else fewer lanes)
    lane_imbalance = 0.10

    def _lane_parts(self, waves: Sequence[torch.Tensor]) -> list[list[int]]:
        """The batch's clips split into lanes for :meth:`_packed_lanes` (a list of clip indices
        per lane, each in batch order; one part: run as one call). On the CPU in float32 with
        ``n >= 2`` torch threads (or :attr:`cpu_lanes`), up to ``n`` lanes of one thread each: the
        clips go longest first to the lane with the fewest samples so far, with the most lanes
        for which each lane has at least :attr:`lane_min_seconds` of audio and none holds more
        than :attr:`lane_imbalance` above an equal share (three equal clips on two threads run as
        one call: a 2:1 split would wait on the longer lane). What it buys on two cores (about
        1.0x on a quiet host, 1.08x on a busy one): the README's Benchmarks, from
        ``python bench/extract_bench.py --lanes-ab 60 15 5 --rounds 8``."""
        one = [list(range(len(waves)))]
        if str(self.device) != "cpu" or self.amp not in (None, "", "fp32"):
            return one
        n = torch.get_num_threads() if self.cpu_lanes is None else int(self.cpu_lanes)
        sizes = [int(w.shape[-1]) for w in waves]
        total = sum(sizes)
        n = min(n, len(waves), int(total / self.sample_rate // self.lane_min_seconds))
        longest_first = sorted(range(len(waves)), key=lambda i: -sizes[i])
        for lanes in range(n, 1, -1):
            load = [0] * lanes
            parts: list[list[int]] = [[] for _ in range(lanes)]
            for i in longest_first:
                j = min(range(lanes), key=load.__getitem__)
                parts[j].append(i)
                load[j] += sizes[i]
            if max(load) <= (1 + self.lane_imbalance) * total / lanes:
                return [sorted(p) for p in parts]
        return one

    def _packed_lanes(self, waves: Sequence[torch.Tensor], parts: list[list[int]]) -> list[list[np.ndarray]]:
        """:meth:`_packed` of each part of the batch (:meth:`_lane_parts`), run at once on worker
        threads with one torch thread each; each clip's frames are its own either way
        (padding-exact per clip). The CNN and transformer seconds added to :attr:`stats` are the
        lanes' mean (wall time while they run together); frames and batches count the batch once."""
        lanes = len(parts)
        lane_stats = [{"cnn_seconds": 0.0, "transformer_seconds": 0.0, "frames": 0, "batches": 0} for _ in parts]

        def run(j: int) -> list[list[np.ndarray]]:
            torch.set_num_threads(1)  # this worker's torch (and BLAS) threads
            return self._packed([waves[i] for i in parts[j]], stats=lane_stats[j])

        threads = torch.get_num_threads()
        try:
            pool = _lane_pool(lanes)
            futures = [pool.submit(run, j) for j in range(lanes)]
            wait(futures)  # every lane done before anything is raised (no lane left running beside a retry)
            results = [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)  # BLAS thread counts can be process-wide: set this thread's back
        out: list[list[np.ndarray]] = [[] for _ in waves]
        for idx, res in zip(parts, results):
            for i, frames in zip(idx, res):
                out[i] = frames
        for key in ("cnn_seconds", "transformer_seconds"):
            self.stats[key] += sum(st[key] for st in lane_stats) / lanes
        self.stats["frames"] += sum(st["frames"] for st in lane_stats)
        self.stats["batches"] += 1
        return out

    def _encode(self, clips: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        if self.packed:
            waves = [torch.from_numpy(self.preprocess(c)).to(self.device) for c in clips]
            parts = self._lane_parts(waves)
            return self._packed_lanes(waves, parts) if len(parts) > 1 else self._packed(waves)
        hs, lengths = self.hidden_states(clips)
        stacked = torch.stack([hs[k] for k in self.layer_ids]).float().cpu().numpy()  # (L, B, T, D)
        return [[np.ascontiguousarray(stacked[k, i, :t]) for k in range(len(self.layer_ids))] for i, t in enumerate(lengths)]

    @torch.inference_mode()
    def _packed(self, waves: Sequence[torch.Tensor], valid: Sequence[int] | None = None,
                count: bool = True, stats: dict[str, Any] | None = None) -> list[list[np.ndarray]]:
        """Each wave's selected layers ``(frames, D)`` through the CNN and :func:`packed_forward`
        (``valid``: real frames per wave, the padded recipe's mask; ``count``: add the frames and
        the batch to :attr:`stats`)."""
        nl = len(self.layer_ids)
        out: list[list[np.ndarray]] = [[np.zeros((0, d), np.float32) for d in self.layer_dims] for _ in waves]
        live = [i for i, w in enumerate(waves) if self.num_frames(len(w)) > 0]
        if not live:
            return out
        with self._autocast():
            t0 = time.perf_counter()
            feats = self.cnn_outputs([waves[i] for i in live])
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            hidden, offsets = packed_forward(self._net, self.config, feats, self.layer_ids,
                                             None if valid is None else [valid[i] for i in live])
            arr = hidden.float().cpu().numpy()
        counts = [int(f.shape[-1]) for f in feats]
        stats = self.stats if stats is None else stats
        stats["cnn_seconds"] += t1 - t0
        stats["transformer_seconds"] += time.perf_counter() - t1
        if count:
            stats["frames"] += sum(counts)
            stats["batches"] += 1
        for i, o, t in zip(live, offsets, counts):
            out[i] = [arr[k, o : o + t] for k in range(nl)]
        return out

    # ------------------------------------------------------------------------------------------
    def common_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0, fast: bool = False
                        ) -> list[list[np.ndarray]]:
        """Each clip's true frames as the usual recipe computes them: :meth:`padded_pipeline`."""
        return self.padded_pipeline(clips, pad_seconds, fast=fast)

    @torch.inference_mode()
    def padded_pipeline(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                        keep_padding: bool = False, fast: bool = False) -> list[list[np.ndarray]]:
        """The usual recipe as it is usually written (``featstore extract --emulate-padding`` and
        the padding audit): ``feature_extractor(clips, padding="max_length", max_length=n,
        truncation=True)`` with the checkpoint's own feature-extractor defaults — its attention mask
        (and with it a normalisation over each clip's own samples) only where it returns one;
        without one, ``do_normalize`` normalises the padded vector, zeros included — then the full
        model on that batch, the mask passed only when returned. Returns each clip's true frames (of
        the clip as cut), or with ``keep_padding`` every frame of the padded input.

        ``fast``: the same function through this encoder's fast paths (each padded window is one
        "clip" of the GEMM CNN, whose group norm then spans the whole window as the model's does;
        the transformer gets the recipe's mask), equal to the model's forward to ~1e-5 — what the
        padding audit uses. Default: the model's own forward, what the recipe runs."""
        n_pad = int(round(float(pad_seconds) * self.sample_rate))
        full = self.num_frames(n_pad)
        if full == 0:
            raise ValueError(f"--emulate-padding {pad_seconds:g} s is shorter than one frame of this model "
                             f"({self.receptive_field_samples / self.sample_rate:g} s)")
        values, attention = self.recipe.padded(clips, n_pad)
        x = torch.from_numpy(values).to(self.device)
        true = [self.num_frames(min(len(c), n_pad)) for c in clips]
        keep = [full if keep_padding else t for t in true]
        if fast and self.packed:
            real = [self.num_frames(int(n)) for n in attention.sum(-1)] if attention is not None else None
            frames = self._packed(list(x), valid=real, count=False)
            self.stats["frames"] += sum(true)
            self.stats["padded_frames"] += len(clips) * full - sum(true)
            self.stats["batches"] += 1
            return [[f[:t] for f in per] for per, t in zip(frames, keep)]
        with self._autocast(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*key_padding_mask.*")
            if fast:
                feats = self.cnn_outputs(list(x))
                real = attention.sum(-1).tolist() if attention is not None else [n_pad] * len(clips)
                hidden, _ = self.forward_hidden_states([x[i, : int(n)] for i, n in enumerate(real)], feats)
            else:
                kwargs = {"attention_mask": torch.from_numpy(attention).to(self.device)} if attention is not None else {}
                hidden = self.model(x, output_hidden_states=True, **kwargs).hidden_states
        stacked = torch.stack([hidden[k] for k in self.layer_ids]).float().cpu().numpy()
        self.stats["frames"] += sum(true)
        self.stats["padded_frames"] += len(clips) * full - sum(true)
        self.stats["batches"] += 1
        return [[np.ascontiguousarray(stacked[k, i, :t]) for k in range(len(self.layer_ids))] for i, t in enumerate(keep)]

    def padding_audit(self, clips: Sequence[np.ndarray], pad_seconds: float = 1.0,
                      frames: Sequence[Sequence[np.ndarray]] | None = None) -> dict[str, Any]:
        keep = [i for i, c in enumerate(clips) if self.num_frames(len(c)) > 0][:8]
        clips = [clips[i] for i in keep]
        if not clips:
            return {}
        padded = self.common_pipeline(clips, pad_seconds, fast=True)
        # each clip's padding-exact frames (to ~1e-6 of a solo run): given, or one batch of them
        solo = [frames[i] for i in keep] if frames is not None else self.encode(clips)
        nl = len(self.layer_ids)
        max_abs = [max(float(np.abs(p[k] - s[k]).max()) for p, s in zip(padded, solo)) for k in range(nl)]
        mean_abs = [float(np.mean([np.abs(p[k] - s[k]).mean() for p, s in zip(padded, solo)])) for k in range(nl)]
        return {
            "clips": len(clips), "pad_seconds": pad_seconds,
            "attention_mask": self.recipe.return_attention_mask,
            "median_clip_seconds": float(np.median([len(c) for c in clips]) / self.sample_rate),
            "layers": self.layer_ids, "max_abs": max_abs, "mean_abs": mean_abs,
        }

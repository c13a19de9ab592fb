"""wav2vec2 / HuBERT / WavLM inference without importing transformers: weights, recipe inputs, a packed forward.

Importing transformers' modelling code and building a model through it takes ~3.5 s on two cores
(``bench/startup_bench.py``), longer than a whole batch. For extraction this module reads the
checkpoint directory itself — ``config.json``, ``preprocessor_config.json`` and one
``model.safetensors`` / ``pytorch_model.bin`` — into plain torch modules named as transformers
names them (so the same code also runs on a transformers model object, sharing its weights), and
runs the forward *packed*: every clip's true frames laid end to end, so each linear layer is one
matrix product over all real frames of the batch and no frame is padding; only attention and the
positional convolution look at one clip at a time, grouped by frame count (clips of equal count in
one call, no mask). transformers' own forward is the reference it is tested against
(``tests/test_native.py``: equal to ~1e-5 on every supported layout) and what fine-tuning, data2vec-audio
and any layout this module does not know use.
"""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

#: model types whose layout this module implements
NATIVE_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
#: config keys the forward reads (a config without one of them is left to transformers)
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
             "conv_kernel", "conv_stride", "feat_extract_norm", "num_conv_pos_embeddings",
             "num_conv_pos_embedding_groups", "layer_norm_eps", "do_stable_layer_norm")


class NativeUnsupported(Exception):
    """This checkpoint's layout or files are not the ones this module implements (use transformers)."""


def unsupported_reason(cfg: dict[str, Any]) -> str | None:
    """Why :func:`load_native` would not handle this config (``None``: it does)."""
    mt = cfg.get("model_type")
    if mt not in NATIVE_MODEL_TYPES:
        return f"model_type {mt!r}"
    missing = [k for k in _REQUIRED if k not in cfg]
    if mt == "wavlm":
        missing += [k for k in ("num_buckets", "max_bucket_distance") if k not in cfg]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    for key in ("feat_extract_activation", "hidden_act"):
        if cfg.get(key, "gelu") != "gelu":
            return f"{key} {cfg.get(key)!r} (only gelu is implemented)"
    if cfg.get("add_adapter"):
        return "an adapter (add_adapter)"
    if cfg.get("conv_pos_batch_norm"):
        return "a batch-norm positional embedding (conv_pos_batch_norm)"
    if cfg["feat_extract_norm"] not in ("group", "layer"):
        return f"feat_extract_norm {cfg['feat_extract_norm']!r}"
    if not len(cfg["conv_dim"]) == len(cfg["conv_kernel"]) == len(cfg["conv_stride"]):
        return "conv_dim, conv_kernel and conv_stride of different lengths"
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        return "hidden_size not divisible by num_attention_heads"
    return None


# ------------------------------------------------------------------------------------------ preprocessing
class RecipeInputs:
    """The checkpoint's ``Wav2Vec2FeatureExtractor`` settings (``preprocessor_config.json``, its
    defaults where absent) and its padded call, as the common recipe makes it:
    ``feature_extractor(clips, padding="max_length", max_length=n, truncation=True)`` — pad with
    ``padding_value`` (or cut) to ``n`` samples, the attention mask only where
    ``return_attention_mask``, then with ``do_normalize`` zero mean / unit variance over each clip's
    own samples when a mask is returned (padding set back to ``padding_value``), over the whole
    padded vector, zeros included, when not. The same numpy operations in the same order as
    transformers (bit-identical: ``tests/test_native.py``)."""

    DEFAULTS = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                "padding_value": 0.0, "padding_side": "right", "return_attention_mask": False, "do_normalize": True}

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = {**self.DEFAULTS, **(settings or {})}
        self.do_normalize = bool(self.settings["do_normalize"])
        self.return_attention_mask = bool(self.settings["return_attention_mask"])
        self.sampling_rate = int(self.settings["sampling_rate"])
        self.padding_value = float(self.settings["padding_value"])
        self.padding_side = str(self.settings["padding_side"])

    @classmethod
    def from_dir(cls, local_dir: Path) -> tuple["RecipeInputs", str]:
        """(settings, note): the note says when the file is missing and the defaults are used."""
        path = Path(local_dir) / "preprocessor_config.json"
        if not path.exists():
            return cls(), "no preprocessor_config.json: Wav2Vec2FeatureExtractor defaults used"
        raw = json.loads(path.read_text())
        kind = raw.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
        note = "" if kind == "Wav2Vec2FeatureExtractor" else (
            f"preprocessor_config.json names {kind}: its do_normalize / return_attention_mask / padding settings are "
            "applied as Wav2Vec2FeatureExtractor applies them")
        return cls({k: v for k, v in raw.items() if k != "processor_class"}), note

    def to_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def normalize(self, clip: np.ndarray) -> np.ndarray:
        """One clip over its own samples (the unpadded call, the padding-exact path)."""
        x = np.asarray(clip, dtype=np.float32)
        if self.do_normalize:
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return x.astype(np.float32, copy=False)

    def padded(self, clips: Sequence[np.ndarray], n_pad: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(input_values (B, n_pad) float32, attention_mask (B, n_pad) int32 or None)``."""
        values, masks = [], []
        for c in clips:
            x = np.asarray(c, dtype=np.float32)[:n_pad]
            n = len(x)
            pad = np.full(n_pad - n, self.padding_value, dtype=np.float32)
            left = self.padding_side == "left"
            values.append(np.concatenate([pad, x] if left else [x, pad]).astype(np.float32))
            m = np.zeros(n_pad, np.int32)
            if left:
                m[n_pad - n :] = 1
            else:
                m[:n] = 1
            masks.append(m)
        if self.do_normalize:
            if self.return_attention_mask:
                normed = []
                for v, length in zip(values, np.array(masks, np.int32).sum(-1)):
                    s = (v - v[:length].mean()) / np.sqrt(v[:length].var() + 1e-7)
                    if length < s.shape[0]:
                        s[length:] = self.padding_value
                    normed.append(s)
                values = normed
            else:
                values = [(v - v.mean()) / np.sqrt(v.var() + 1e-7) for v in values]
        out = np.stack([np.asarray(v, dtype=np.float32) for v in values])
        return out, (np.stack(masks) if self.return_attention_mask else None)


# ------------------------------------------------------------------------------------------ modules
class _Node(nn.Module):
    """A named container (the attribute paths are transformers' parameter names)."""


def _linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, device="meta")


def build_tree(cfg: dict[str, Any]) -> nn.Module:
    """Empty (meta-device) modules of ``cfg``'s layout, named as transformers names them."""
    e, h, eps = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), float(cfg["layer_norm_eps"])
    wavlm = cfg["model_type"] == "wavlm"
    root = _Node()
    root.feature_extractor = fe = _Node()
    fe.conv_layers = nn.ModuleList()
    dims = [1] + [int(d) for d in cfg["conv_dim"]]
    for i, (k, s) in enumerate(zip(cfg["conv_kernel"], cfg["conv_stride"])):
        m = _Node()
        m.conv = nn.Conv1d(dims[i], dims[i + 1], int(k), stride=int(s), bias=bool(cfg.get("conv_bias", False)),
                           device="meta")
        if cfg["feat_extract_norm"] == "layer":
            m.layer_norm = nn.LayerNorm(dims[i + 1], elementwise_affine=True, device="meta")
        elif i == 0:
            m.layer_norm = nn.GroupNorm(dims[1], dims[1], affine=True, device="meta")
        m.activation = nn.GELU()
        fe.conv_layers.append(m)
    root.feature_projection = fp = _Node()
    if cfg["model_type"] != "hubert" or cfg.get("feat_proj_layer_norm", True):
        fp.layer_norm = nn.LayerNorm(dims[-1], eps=eps, device="meta")
    fp.projection = _linear(dims[-1], e)
    root.encoder = enc = _Node()
    k = int(cfg["num_conv_pos_embeddings"])
    enc.pos_conv_embed = pos = _Node()
    pos.conv = nn.Conv1d(e, e, k, padding=k // 2, groups=int(cfg["num_conv_pos_embedding_groups"]), device="meta")
    pos.padding = nn.Identity()  # the "same" padding's extra frame: dropped by cropping to the input length
    pos.activation = nn.GELU()
    enc.layer_norm = nn.LayerNorm(e, eps=eps, device="meta")
    enc.layers = nn.ModuleList()
    for i in range(int(cfg["num_hidden_layers"])):
        layer = _Node()
        layer.attention = a = _Node()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(a, name, _linear(e, e))
        a.num_heads, a.head_dim = h, e // h
        if wavlm:
            a.gru_rel_pos_const = nn.Parameter(torch.empty(1, h, 1, 1, device="meta"))
            a.gru_rel_pos_linear = _linear(e // h, 8)
            a.num_buckets, a.max_distance = int(cfg["num_buckets"]), int(cfg["max_bucket_distance"])
            if i == 0:
                a.rel_attn_embed = _Node()  # an embedding table (nn.Embedding's meta init costs ~2.5 s of imports)
                a.rel_attn_embed.weight = nn.Parameter(torch.empty(a.num_buckets, h, device="meta"))
        layer.layer_norm = nn.LayerNorm(e, eps=eps, device="meta")
        layer.feed_forward = ff = _Node()
        ff.intermediate_dense = _linear(e, int(cfg["intermediate_size"]))
        ff.output_dense = _linear(int(cfg["intermediate_size"]), e)
        layer.final_layer_norm = nn.LayerNorm(e, eps=eps, device="meta")
        enc.layers.append(layer)
    return root


def read_weights(local_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors from one ``model.safetensors`` or ``pytorch_model.bin``."""
    local_dir = Path(local_dir)
    st = local_dir / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = local_dir / "pytorch_model.bin"
    if pt.is_file():
        try:
            return torch.load(str(pt), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # torch's legacy (pre-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise NativeUnsupported("no single model.safetensors or pytorch_model.bin (sharded checkpoints go through transformers)")


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a task model's prefix (``wav2vec2.``, ``hubert.``, ``wavlm.``) and fold the weight-norm
    parameters of the positional convolution into its weight (both spellings)."""
    anchor = "feature_extractor.conv_layers.0.conv.weight"
    prefix = next((p for p in ("", "wav2vec2.", "hubert.", "wavlm.") if p + anchor in sd), None)
    if prefix is None:
        raise NativeUnsupported("the weights hold no feature_extractor.conv_layers.0.conv.weight")
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    base = "encoder.pos_conv_embed.conv."
    for g_key, v_key in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        if base + g_key in out and base + v_key in out:
            g, v = out.pop(base + g_key).float(), out.pop(base + v_key).float()
            out[base + "weight"] = torch._weight_norm(v, g, 2)
    return out


def load_native(cfg: dict[str, Any], local_dir: Path, device: str = "cpu") -> nn.Module:
    """The modules of :func:`build_tree` with the checkpoint's weights (float32, on ``device``);
    :class:`NativeUnsupported` when the layout or the files are not the known ones."""
    why = unsupported_reason(cfg)
    if why:
        raise NativeUnsupported(why)
    tree = build_tree(cfg)
    sd = _normalise_keys(read_weights(local_dir))
    wanted = tree.state_dict(keep_vars=True)
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise NativeUnsupported(f"the weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    bad = [k for k in wanted if tuple(sd[k].shape) != tuple(wanted[k].shape)]
    if bad:
        raise NativeUnsupported(f"{bad[0]} has shape {tuple(sd[bad[0]].shape)}, the config says {tuple(wanted[bad[0]].shape)}")
    tree.load_state_dict({k: sd[k].to(device=device, dtype=torch.float32) for k in wanted}, strict=True, assign=True)
    for p in tree.parameters():
        p.requires_grad_(False)
    return tree.eval()


# ------------------------------------------------------------------------------------------ forward
def _pos_conv_cropped(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The positional convolution with its kernel cut to the taps that can meet a frame.

    Output ``t`` of the "same" convolution reads input ``t + j - pad`` through tap ``j``; with
    ``T`` frames only taps ``pad - (T - 1) .. pad + T - 1`` ever read one, so on short inputs
    (``2 T - 1`` below the kernel's 128) the rest multiply zero padding. Same sums without the zero
    terms (float rounding aside). Padding frames are zero on input (the model zeroes them first).
    """
    conv = module.conv
    x = hidden_states.transpose(1, 2)
    t = x.shape[-1]
    k, pad = conv.kernel_size[0], conv.padding[0]
    lo, hi = max(0, pad - (t - 1)), min(k - 1, pad + t - 1)
    w = conv.weight  # weight norm recomputed here, as in the module (cheap next to the conv)
    if lo > 0 or hi < k - 1:
        w = w[:, :, lo : hi + 1]
    y = nn.functional.conv1d(x, w, conv.bias, padding=pad - lo, groups=conv.groups)[..., :t]
    return module.activation(y).transpose(1, 2)


def _cached(module: nn.Module, key: str, build, *params: torch.Tensor) -> torch.Tensor:
    """``build()`` kept on ``module`` while ``params`` are the same tensors at the same version —
    only for frozen weights (``requires_grad`` false): trainable ones are rebuilt every call, since
    an optimizer may change them without a version bump (the fused AdamW kernel does)."""
    if any(p.requires_grad for p in params):
        return build() if torch.is_grad_enabled() else build().detach()
    versions = tuple(p._version for p in params)
    hit = module.__dict__.get("_featstore_" + key)
    # the very same tensors (held, so a new tensor cannot take a freed one's id) at the same versions
    if hit is not None and hit[0] == versions and len(hit[1]) == len(params) and all(a is b for a, b in zip(hit[1], params)):
        return hit[2]
    with torch.no_grad():
        value = build().detach()
    module.__dict__["_featstore_" + key] = (versions, params, value)
    return value


def scratch_ok(x: torch.Tensor) -> bool:
    """Whether products may write into reused buffers (:func:`scratch`): CPU, float32, no autograd,
    no autocast (CUDA's caching allocator reuses memory by itself)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


def scratch(owner: nn.Module, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(rows, cols)`` buffer named ``name`` kept on ``owner`` and reused from batch to batch
    (grown when too small). A fresh tensor above glibc's 32-MB mmap ceiling is new memory every
    time, and its first write page-faults (~25 ms per 34 MB here, a fifth of the transformer's time
    in ``bench/extract_bench.py`` profiles); a reused one is already mapped. Only for
    intermediates: never return one (the next call overwrites it). Kept per thread (concurrent
    lanes of one model, ``SSLEncoder._packed_lanes``, each have their own; a thread's first call
    drops the buffers of threads that have ended)."""
    pools = owner.__dict__.setdefault("_featstore_scratch", {})
    pool = pools.get(threading.get_ident())
    if pool is None:
        live = {t.ident for t in threading.enumerate()}
        for ident in [i for i in pools if i not in live]:
            pools.pop(ident, None)
        pool = pools.setdefault(threading.get_ident(), {})
    need = rows * cols
    buf = pool.get(name)
    if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
        # a quarter of headroom: batches of slowly growing size reuse one buffer
        buf = torch.empty(need + need // 4, dtype=like.dtype, device=like.device)
        pool[name] = buf
    return buf[:need].view(rows, cols)


def _linear_into(owner: nn.Module, name: str, x: torch.Tensor, lin: nn.Linear | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` (2-D ``x``), written into :func:`scratch` ``name`` where :func:`scratch_ok`: the
    product, then the bias added in place (on these CPUs ``addmm``'s bias pass costs ~25 % of the
    product; an in-place add of a row to a buffer in cache ~3 %)."""
    w = lin.weight if lin is not None else weight
    b = lin.bias if lin is not None else bias
    if not scratch_ok(x):
        return nn.functional.linear(x, w, b)
    out = torch.mm(x, w.t(), out=scratch(owner, name, x.shape[0], w.shape[0], x))
    return out.add_(b) if b is not None else out


def _relative_buckets(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """WavLM's bucketing of relative positions (``WavLMAttention._relative_positions_bucket``)."""
    half = num_buckets // 2
    buckets = (rel > 0).to(torch.long) * half
    rel = torch.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    large = torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    large = torch.min((max_exact + large).to(torch.long), torch.full_like(rel, half - 1))
    return buckets + torch.where(is_small, rel, large)


def _position_bias(attn0: nn.Module, t: int) -> torch.Tensor:
    """``(1, heads, t, t)``: WavLM's relative position bias for ``t`` frames (first layer's table)."""
    dev = attn0.rel_attn_embed.weight.device
    pos = torch.arange(t, dtype=torch.long, device=dev)
    bucket = _relative_buckets(pos[None, :] - pos[:, None], attn0.num_buckets, attn0.max_distance)
    return nn.functional.embedding(bucket, attn0.rel_attn_embed.weight).permute(2, 0, 1)[None]


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU in place (a fresh product's output: one pass less over the widest tensor)."""
    return torch._C._nn.gelu_(x)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def packed_forward(net: nn.Module, cfg: dict[str, Any], feats: Sequence[torch.Tensor], layer_ids: Sequence[int],
                   valid: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """``hidden_states[k]`` for ``k`` in ``layer_ids`` of each clip: ``(len(layer_ids), sum(T_i), D)``, clip
    ``i``'s frames at rows ``offsets[i] : offsets[i] + T_i``; returns that and ``offsets``.

    ``feats``: each clip's CNN frames ``(C, T_i)`` (:func:`~featstore.encoders.hf_ssl.gemm_cnn`).
    ``valid``: each clip's frames that are real (the padded recipe: only the first ``valid[i]``
    frames are attended to, the rest zeroed before the positional convolution, as the model does
    with an attention mask); ``None``: all. ``net``: :func:`load_native`'s modules or a
    transformers model of the same layout. No autograd (extraction)."""
    e = int(cfg["hidden_size"])
    stable = bool(cfg["do_stable_layer_norm"])
    wavlm = cfg["model_type"] == "wavlm"
    counts = [int(f.shape[-1]) for f in feats]
    order = sorted(range(len(feats)), key=lambda i: (counts[i], i))
    offsets = [0] * len(feats)
    groups: list[tuple[int, int, int, list[int]]] = []  # (row offset, clips, frames, clip indices)
    row = 0
    for i in order:
        offsets[i] = row
        if groups and groups[-1][2] == counts[i]:
            off, n, t, idx = groups[-1]
            groups[-1] = (off, n + 1, t, idx + [i])
        else:
            groups.append((row, 1, counts[i], [i]))
        row += counts[i]
    total = row
    device = feats[0].device
    x = torch.cat([feats[i].t() for i in order]) if len(feats) > 1 else feats[0].t().contiguous()
    fp = net.feature_projection
    if getattr(fp, "layer_norm", None) is not None:
        x = _layer_norm(fp.layer_norm, x)
    x = nn.functional.linear(x, fp.projection.weight, fp.projection.bias)  # (N, E)

    masks: dict[int, torch.Tensor | None] = {}  # group -> (n, 1, 1, T) bool: key is real
    if valid is not None:
        keep = torch.ones(total, dtype=torch.bool, device=device)
        for gi, (off, n, t, idx) in enumerate(groups):
            v = torch.tensor([min(int(valid[i]), t) for i in idx], device=device)
            real = torch.arange(t, device=device)[None] < v[:, None]  # (n, T)
            if not bool(real.all()):
                keep[off : off + n * t] = real.reshape(-1)
                masks[gi] = real[:, None, None, :]
        x = x * keep[:, None].to(x.dtype)  # the model zeroes masked frames before the positional conv

    enc = net.encoder
    pos = enc.pos_conv_embed
    posed = torch.empty_like(x)
    for off, n, t, _ in groups:
        posed[off : off + n * t] = _pos_conv_cropped(pos, x[off : off + n * t].view(n, t, e)).reshape(n * t, e)
    h = x + posed
    if not stable:
        h = _layer_norm(enc.layer_norm, h)

    out = torch.empty(len(layer_ids), total, e, dtype=h.dtype, device=device)
    slot = {k: j for j, k in enumerate(layer_ids)}
    if 0 in slot:
        out[slot[0]] = h
    layers = list(enc.layers)
    heads = int(cfg["num_attention_heads"])
    d = e // heads
    biases: dict[int, torch.Tensor] = {}
    for li, layer in enumerate(layers):
        if li >= max(layer_ids):  # the layers above the highest one asked for are not computed
            break
        a = layer.attention
        a_in = _layer_norm(layer.layer_norm, h) if stable else h
        w = _cached(a, "qkv_w", lambda: torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        b = _cached(a, "qkv_b", lambda: torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                    a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
        qkv = _linear_into(net, "qkv", a_in, weight=w, bias=b)  # (N, 3E)
        if wavlm:
            rel = nn.functional.linear(a_in.view(total, heads, d), a.gru_rel_pos_linear.weight, a.gru_rel_pos_linear.bias)
            gate_a, gate_b = torch.sigmoid(rel.view(total, heads, 2, 4).sum(-1)).unbind(-1)  # (N, H) each
            gate = gate_a * (gate_b * a.gru_rel_pos_const.view(1, heads) - 1.0) + 2.0
        ctx = scratch(net, "ctx", total, e, h) if scratch_ok(h) else torch.empty(total, e, dtype=h.dtype, device=device)
        for gi, (off, n, t, _) in enumerate(groups):
            q, k, v = qkv[off : off + n * t].view(n, t, 3, heads, d).permute(2, 0, 3, 1, 4)
            bias = None
            if wavlm:
                if t not in biases:
                    biases[t] = _position_bias(layers[0].attention, t)
                bias = gate[off : off + n * t].view(n, t, heads).permute(0, 2, 1)[..., None] * biases[t]
            m = masks.get(gi)
            if m is not None:
                if bias is None:  # wav2vec2 / HuBERT: the dtype's minimum, as transformers' mask
                    bias = torch.zeros(n, 1, 1, t, dtype=q.dtype, device=device).masked_fill(~m, torch.finfo(q.dtype).min)
                else:  # WavLM: key padding mask -> -inf (multi_head_attention_forward)
                    bias = bias.masked_fill(~m, float("-inf"))
            o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))  # (n, H, T, d)
            ctx[off : off + n * t] = o.transpose(1, 2).reshape(n * t, e)
        attn = _linear_into(net, "attn", ctx, a.out_proj)
        ff = layer.feed_forward
        reuse = scratch_ok(h)  # the products are scratch buffers: residual sums in place there
        if stable:
            h = h + attn
            f = _gelu_(_linear_into(net, "ff1", _layer_norm(layer.final_layer_norm, h), ff.intermediate_dense))
            h = h + _linear_into(net, "ff2", f, ff.output_dense)
        else:
            h = _layer_norm(layer.layer_norm, attn.add_(h) if reuse else h + attn)
            f = _gelu_(_linear_into(net, "ff1", h, ff.intermediate_dense))
            f2 = _linear_into(net, "ff2", f, ff.output_dense)
            h = _layer_norm(layer.final_layer_norm, f2.add_(h) if reuse else h + f2)
        if li + 1 in slot:
            out[slot[li + 1]] = h
    return out, offsets

"""Model names -> encoders: short aliases, hub ids, local directories, acoustic front ends."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from featstore.encoders.base import Encoder

#: short alias -> Hugging Face hub id
ALIASES: dict[str, str] = {
    "wavlm-base": "microsoft/wavlm-base",
    "wavlm-base-plus": "microsoft/wavlm-base-plus",
    "wavlm-large": "microsoft/wavlm-large",
    "wav2vec2-base": "facebook/wav2vec2-base",
    "wav2vec2-large": "facebook/wav2vec2-large-lv60",
    "wav2vec2-xlsr-300m": "facebook/wav2vec2-xls-r-300m",
    "hubert-base": "facebook/hubert-base-ls960",
    "hubert-large": "facebook/hubert-large-ll60k",
    "data2vec-audio-base": "facebook/data2vec-audio-base",
    "data2vec-audio-large": "facebook/data2vec-audio-large",
    "whisper-tiny": "openai/whisper-tiny",
    "whisper-tiny.en": "openai/whisper-tiny.en",
    "whisper-base": "openai/whisper-base",
    "whisper-base.en": "openai/whisper-base.en",
    "whisper-small": "openai/whisper-small",
    "whisper-medium": "openai/whisper-medium",
    "whisper-large-v3": "openai/whisper-large-v3",
}
#: front-end names (no weights); see featstore.encoders.frontends
FRONTEND_NAMES = ("logmel", "mfcc", "spectral")
SSL_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")


class ModelNotAvailable(RuntimeError):
    """The weights are neither a local directory nor in the local Hugging Face cache."""


def resolve_alias(name: str) -> str:
    """``wavlm-base-plus`` -> ``microsoft/wavlm-base-plus``; anything else unchanged."""
    return ALIASES.get(name, name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_pretrained(name: str, background_hash: bool = False) -> tuple[Path, Any]:
    """Find the weights of ``name`` (alias, hub id or directory): ``(local_dir, revision)``.

    A directory is used as is (revision = content hash of its config and weights). A hub id is
    looked up in the local Hugging Face cache first; only when it is absent and the hub is not
    switched off (``HF_HUB_OFFLINE``) is a download tried. Failure raises :class:`ModelNotAvailable`
    with instructions instead of a traceback. ``background_hash``: a directory's revision is a
    future, hashed in a thread (hashlib and file reads release the GIL) while the caller goes on
    building the model (:attr:`Encoder.revision` waits for it when read).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailable(f"{path} is a directory but holds no config.json (not a Hugging Face model)")
        if background_hash:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featstore-hash")
            future = pool.submit(lambda: "sha256:" + content_hash(path))
            pool.shutdown(wait=False)
            return path.resolve(), future
        return path.resolve(), "sha256:" + content_hash(path)
    if path.suffix or name.startswith((".", "/", "~")):
        raise ModelNotAvailable(f"no model directory at {path}")
    hub_id = resolve_alias(name)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        local = snapshot_download(hub_id, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - any cache miss ends in the same advice
        local = None
        if not _offline():
            try:
                local = snapshot_download(hub_id, allow_patterns=patterns)
            except Exception as exc:  # noqa: BLE001
                raise ModelNotAvailable(_advice(name, hub_id, f"download failed: {type(exc).__name__}")) from None
        if local is None:
            raise ModelNotAvailable(_advice(name, hub_id, "offline (HF_HUB_OFFLINE=1)")) from None
    local = Path(local)
    if not (local / "config.json").exists():
        raise ModelNotAvailable(_advice(name, hub_id, "the cached snapshot holds no config.json"))
    return local, local.name  # snapshots/<commit hash>


def _advice(name: str, hub_id: str, why: str) -> str:
    return (
        f"model '{name}' ({hub_id}) is not in the local Hugging Face cache and cannot be fetched ({why}). "
        f"On a machine with internet run:  huggingface-cli download {hub_id}  (it lands in "
        f"~/.cache/huggingface/hub, or $HF_HOME), copy that cache here, or pass a local model directory "
        f"made with save_pretrained: --model /path/to/dir"
    )


def content_hash(directory: Path) -> str:
    """sha256 over config and weight files of a model directory (name + bytes), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def load_encoder(name: str, device: str = "auto", random_init: int | None = None, **options: Any) -> Encoder:
    """Build the encoder for ``name``: a front end, an SSL model or a Whisper encoder.

    ``options`` are passed to the encoder (e.g. ``context_seconds`` for Whisper, front-end settings).
    ``random_init=SEED``: the same architecture with seeded random weights, a control
    (:func:`randomize_weights`); a front end has no weights and raises ``ValueError``.
    """
    if random_init is not None:
        check_seed(random_init)
    if name in FRONTEND_NAMES:
        if random_init is not None:
            raise ValueError(f"--random-init needs a model with weights; the front end {name!r} has none "
                             "(its features are fixed formulas): use an SSL or Whisper model")
        from featstore.encoders.frontends import make_frontend

        return make_frontend(name, **options)
    # the weights' content hash starts first: it reads and hashes beside torch's import (device
    # "auto" imports torch, ~1 s), not after it
    local, revision = resolve_pretrained(name, background_hash=True)
    device = pick_device(device)
    import json

    model_type = json.loads((local / "config.json").read_text()).get("model_type", "")
    if model_type not in (*SSL_MODEL_TYPES, "whisper"):
        raise ModelNotAvailable(
            f"model '{name}' has model_type '{model_type}'; supported: {', '.join(SSL_MODEL_TYPES)}, whisper, "
            f"or a front end ({', '.join(FRONTEND_NAMES)})"
        )
    encoder: Encoder
    if model_type == "whisper":
        from featstore.encoders.whisper import WhisperEncoder

        encoder = WhisperEncoder(local, name=name, revision=revision, device=device, **options)
    else:
        from featstore.encoders.hf_ssl import SSLEncoder

        encoder = SSLEncoder(local, name=name, revision=revision, device=device, **options)
    return randomize_weights(encoder, random_init) if random_init is not None else encoder


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: the ``control`` root attribute of a random-init store (``probes.names.RANDOM_INIT`` reads it)
RANDOM_INIT = "random-init"


def check_seed(seed: Any) -> int:
    """A random-init seed: an integer in ``[0, 2**63)`` (``ValueError`` otherwise)."""
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"--random-init must be a whole number >= 0 (the seed), got {seed!r}")
    return int(seed)


def random_init_model(config: Any, seed: int):
    """A freshly initialised Hugging Face model of ``config``'s architecture: ``torch.manual_seed(seed)``
    then the model class's own initialisation (``AutoModel.from_config``), built on the CPU in
    float32 so the weights are the same on every device. The caller's random state is left as it was."""
    import torch
    from transformers import AutoModel

    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config, dtype=torch.float32)
    return model.eval()


def randomize_weights(encoder: Encoder, seed: int) -> Encoder:
    """Replace ``encoder``'s weights by :func:`random_init_model` of its own config (a control).

    The store then says so: ``control = "random-init"``, ``random_init_seed = seed``,
    ``encoder_revision = "random-init:<seed>"`` (so it never shares an identity with the trained
    weights) and ``random_init_source_revision`` (the checkpoint the architecture was read from).
    Works for SSL encoders (``.model``) and Whisper encoders (``.encoder``, the encoder half of a
    fresh ``WhisperModel``).
    """
    seed = check_seed(seed)
    if hasattr(encoder, "model") and hasattr(encoder.model, "config"):  # SSL
        fresh = random_init_model(encoder.model.config, seed)
        encoder.model = fresh.to(encoder.device).eval()
    elif hasattr(encoder, "encoder") and hasattr(encoder.encoder, "config"):  # Whisper
        fresh = random_init_model(encoder.encoder.config, seed)
        encoder.encoder = fresh.get_encoder().to(encoder.device).eval()
        del fresh
    else:
        raise ValueError(f"--random-init: {type(encoder).__name__} has no weights to replace")
    source = encoder.revision
    encoder.revision = f"{RANDOM_INIT}:{seed}"
    encoder.extra_attrs = {**encoder.extra_attrs, "control": RANDOM_INIT, "random_init_seed": seed,
                           "random_init_source_revision": source}
    return encoder

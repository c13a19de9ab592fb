"""Encoders: Hugging Face SSL models, Whisper encoders and acoustic front ends."""
from featstore.encoders.base import Encoder
from featstore.encoders.registry import ModelNotAvailable, load_encoder, resolve_alias

__all__ = ["Encoder", "ModelNotAvailable", "load_encoder", "resolve_alias"]

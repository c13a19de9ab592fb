"""The fine-tuning error type (user mistakes, shown as one line by the CLI)."""
from __future__ import annotations


class FinetuneError(ValueError):
    """A user mistake: a bad option, an unusable manifest or model, nothing left to train on."""

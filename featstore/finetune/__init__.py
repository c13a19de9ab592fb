"""Partial fine-tuning of a speech model into a checkpoint the store can extract.

``finetune(model, manifest, out)`` trains a classification head over masked, true-length pooling
of the backbone's frames (never a padded frame, never the padding of a Whisper window), in two
phases: the head alone for ``head_only_steps`` steps, then the head with the top ``unfreeze_top``
transformer layers. The CNN feature encoder (Whisper: the conv stem) and the lower layers stay
frozen (verified bit-identical afterwards). The split is speaker-grouped
(:func:`featstore.cv.holdout_split`), early stopping watches validation balanced accuracy, and the
best state is saved as a plain Hugging Face model directory (``save_pretrained`` + the feature
extractor config; Whisper: a ``WhisperModel`` plus ``featstore_encoder.json`` recording the
window), so ``featstore extract --model OUT`` reads it like any other checkpoint; the head lies
beside it (``head.pt``, ``head_config.json``) with ``log.json`` and ``validation.csv`` (the
held-out rows, a manifest to compare held-out speakers before and after).

Batches are padding-exact as in extraction: the encoders' public ``forward_hidden_states`` runs
with gradients. A frozen part's outputs are computed once per clip and reused (the CNN frames of
an SSL model; the hidden state entering the first unfrozen Whisper layer), within ``cache_gb``;
while the whole backbone is frozen (the head-only phase, or ``unfreeze_top=0``) the head trains on
cached pooled inputs. LayerDrop and SpecAugment stay off (the backbone is in eval mode; only the
unfrozen layers and the head use dropout).

Modules: :mod:`.trainer` (:class:`Trainer`, one method per phase), :mod:`.backbones` (what each
model family contributes), :mod:`.head`, :mod:`.data`.
"""
from featstore.finetune.backbones import Backbone, FrozenCache, SSLBackbone, WhisperBackbone, open_backbone
from featstore.finetune.data import VALIDATION_MANIFEST, Item, load_items, parse_fold
from featstore.finetune.errors import FinetuneError
from featstore.finetune.head import HEAD_CONFIG, HEAD_WEIGHTS, POOLINGS, ClassifierHead, load_head
from featstore.finetune.trainer import LOG_NAME, FinetuneConfig, FinetuneResult, Trainer, finetune

__all__ = ["POOLINGS", "FinetuneError", "FinetuneConfig", "FinetuneResult", "Trainer", "ClassifierHead", "finetune",
           "parse_fold", "load_head", "load_items", "Item", "Backbone", "SSLBackbone", "WhisperBackbone",
           "FrozenCache", "open_backbone", "HEAD_WEIGHTS", "HEAD_CONFIG", "LOG_NAME", "VALIDATION_MANIFEST"]

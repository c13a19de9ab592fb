"""Probes as scikit-learn classifiers: logistic regression, xgboost, attentive MLP, weighted layers.

Every probe follows scikit-learn's conventions (parameters only stored by ``__init__``; ``fit``
sets ``classes_`` and returns ``self``; ``predict_proba`` columns follow ``classes_``; string
labels work) and is seeded by ``random_state``. Inputs differ (see :func:`probe_input_kind`):

* ``logreg`` / ``xgb``: pooled vectors ``(n, dim)`` (``probes.pooling.pooled_matrix``);
* ``attn-mlp``: a sequence of ``(T_i, dim)`` frame arrays (``probes.pooling.frame_sequences``);
* ``weighted-layers``: ``(n, n_layers, dim)`` (``probes.pooling.all_layers_matrix``).

``class_weight`` is one of ``None`` (or ``"none"``), ``"balanced"`` (loss weights inversely
proportional to class frequency) or ``"sampling"`` (balanced sampling: random over-sampling of the
training set for logreg/xgb, a balanced batch sampler for the torch probes).

``fit(X, y, groups=None)``: where ``groups`` (speakers) are given, the inner splits that pick
``C="auto"`` or stop the torch probes early are grouped too, so that they do not reward
remembering speakers.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featstore.cv import inner_folds, validation_split
from probes.names import CLASS_WEIGHTS, PROBE_INPUT, PROBES

#: ``class_weight`` values a probe accepts: ``None`` and the names of ``probes.names.CLASS_WEIGHTS``
#: (``"none"`` is read as ``None``)
CLASS_WEIGHT_VALUES = (None,) + tuple(c for c in CLASS_WEIGHTS if c != "none")
#: grid searched by ``LogRegProbe(C="auto")``
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def check_class_weight(class_weight: Any) -> str | dict | None:
    """Normalise ``class_weight`` (``"none"`` -> ``None``); ValueError listing the valid values.

    Besides :data:`CLASS_WEIGHT_VALUES`, a dict ``{class: weight}`` (scikit-learn style) is accepted.
    """
    if class_weight is None or (isinstance(class_weight, str) and class_weight == "none"):
        return None
    if isinstance(class_weight, str) and class_weight in CLASS_WEIGHT_VALUES:
        return class_weight
    if isinstance(class_weight, dict) and all(np.isscalar(w) and w >= 0 for w in class_weight.values()):
        return class_weight
    raise ValueError(
        f"class_weight={class_weight!r} is not valid; use one of None, 'none', 'balanced', 'sampling' "
        "(or a dict {class: weight >= 0})"
    )


def _class_weights(cw: str | dict | None, classes: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Per-class loss weights (``classes_`` order) for ``"balanced"`` or a dict; else None."""
    if cw == "balanced":
        counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
        return len(y) / (len(classes) * np.maximum(counts, 1))
    if isinstance(cw, dict):
        return np.array([float(cw.get(c, cw.get(str(c), 1.0))) for c in classes])
    return None


def _encode_labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D (one label per item), got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"X has {n} items but y has {len(y)} labels")
    check_classification_targets(y)
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y holds only one class ({classes.tolist()[0]!r}); a probe needs at least 2 classes")
    return classes, encoded.astype(np.int64)


def oversample_indices(y: np.ndarray, random_state: int = 0) -> np.ndarray:
    """Indices of a balanced training set: every item once plus random repeats of smaller classes."""
    rng = np.random.default_rng(random_state)
    counts = np.bincount(y)
    parts = [np.arange(len(y))]
    for c, count in enumerate(counts):
        if 0 < count < counts.max():
            parts.append(rng.choice(np.flatnonzero(y == c), counts.max() - count, replace=True))
    return np.concatenate(parts)


def _check_groups(groups: Any, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per item ({n}), got shape {groups.shape}")
    return groups


class _ProbeBase(ClassifierMixin, BaseEstimator):
    """``predict`` from ``predict_proba``."""

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# ---------------------------------------------------------------------------------------------
# Pooled-vector probes
# ---------------------------------------------------------------------------------------------
class LogRegProbe(_ProbeBase):
    """Standardisation + multinomial logistic regression (lbfgs) on pooled vectors.

    ``C=1.0`` (the default) is a fixed, documented choice: moderate L2 on standardised features,
    stable across layers so that layers are compared with the same probe. ``C="auto"`` picks C
    from :data:`C_GRID` by balanced accuracy in a 3-fold inner CV (grouped by ``groups`` when
    given to ``fit``); the choice is in ``C_``.
    """

    def __init__(self, C: float | str = 1.0, class_weight: str | None = None, max_iter: int = 2000,
                 random_state: int = 0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit_one(self, X: np.ndarray, y: np.ndarray, C: float, cw: str | dict | None):
        if cw == "sampling":
            idx = oversample_indices(y, self.random_state)
            X, y = X[idx], y[idx]
        weights = _class_weights(cw, self.classes_, y)
        lr = LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.random_state,
                                class_weight=None if weights is None else dict(enumerate(weights)))
        return make_pipeline(StandardScaler(), lr).fit(X, y)

    def _select_C(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, cw: str | None) -> float:
        folds = inner_folds(y, groups, 3, self.random_state)
        if not folds:
            return 1.0
        scores = []
        for C in C_GRID:
            fold_scores = [balanced_accuracy_score(y[va], self._fit_one(X[tr], y[tr], C, cw).predict(X[va]))
                           for tr, va in folds]
            scores.append(np.mean(fold_scores))
        return float(C_GRID[int(np.argmax(scores))])  # first maximum: the smallest C among ties

    def fit(self, X: Any, y: Any, groups: Any = None) -> "LogRegProbe":
        cw = check_class_weight(self.class_weight)
        if not (self.C == "auto" or (isinstance(self.C, (int, float)) and self.C > 0)):
            raise ValueError(f"C must be a positive number or 'auto', got {self.C!r}")
        X, y = validate_data(self, X, y, dtype=np.float64)
        self.classes_, yi = _encode_labels(y, len(X))
        groups = _check_groups(groups, len(X))
        self.C_ = self._select_C(X, yi, groups, cw) if self.C == "auto" else float(self.C)
        self.model_ = self._fit_one(X, yi, self.C_, cw)
        self.n_iter_ = self.model_[-1].n_iter_
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.model_.predict_proba(X)


class XGBProbe(_ProbeBase):
    """Gradient-boosted trees (xgboost ``hist``) on pooled vectors.

    Modest, early-stop-free trees tuned for speed on wide inputs: ``max_bin=16`` (the per-tree cost
    of ``hist`` grows with features x bins, whatever the column sampling), row subsampling
    (``subsample``) and feature subsampling per tree (``colsample_bytree``).
    """

    def __init__(self, n_estimators: int = 100, max_depth: int = 4, learning_rate: float = 0.1,
                 class_weight: str | None = None, n_jobs: int = 1, random_state: int = 0,
                 max_bin: int = 16, subsample: float = 0.8, colsample_bytree: float = 0.3):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.max_bin = max_bin
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree

    def fit(self, X: Any, y: Any, groups: Any = None) -> "XGBProbe":
        """``groups`` is accepted for a uniform interface and not used."""
        from xgboost import XGBClassifier

        cw = check_class_weight(self.class_weight)
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, yi = _encode_labels(y, len(X))
        weights = _class_weights(cw, self.classes_, yi)
        weight = None if weights is None else weights[yi]
        if cw == "sampling":
            idx = oversample_indices(yi, self.random_state)
            X, yi = X[idx], yi[idx]
        self.model_ = XGBClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth, learning_rate=self.learning_rate,
            tree_method="hist", max_bin=self.max_bin, subsample=self.subsample,
            colsample_bytree=self.colsample_bytree, n_jobs=self.n_jobs, random_state=self.random_state,
            verbosity=0,
        )
        self.model_.fit(X, yi, sample_weight=weight)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        p = self.model_.predict_proba(X).astype(np.float64)
        return p / p.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Torch probes
# ---------------------------------------------------------------------------------------------
@contextmanager
def _torch_scope(n_threads: int | None, seed: int) -> Iterator[Any]:
    """Seed torch and limit its threads for the duration (restoring both afterwards)."""
    import torch

    before = torch.get_num_threads()
    if n_threads is not None:
        if not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        torch.set_num_threads(int(n_threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            yield torch
    finally:
        torch.set_num_threads(before)


def _tensor(torch: Any, values: np.ndarray | None, device: str) -> Any:
    return None if values is None else torch.tensor(values, dtype=torch.float32, device=device)


class _AdamW:
    """Minimal AdamW (decoupled weight decay), as ``torch.optim.AdamW`` computes it.

    ``torch.optim`` optimizers import ``torch._dynamo`` on construction (~5 s per process on the
    project's machines); a probe that trains in a second cannot pay that in every worker.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.groups = [dict(g, lr=g.get("lr", lr)) for g in groups]
        self.betas, self.eps, self.t = betas, eps, 0
        self.state = [[(torch.zeros_like(p), torch.zeros_like(p)) for p in g["params"]] for g in self.groups]

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, np.sqrt(1 - b2**self.t)
        with torch.no_grad():
            for g, state in zip(self.groups, self.state):
                for p, (m, v) in zip(g["params"], state):
                    if p.grad is None:
                        continue
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                    m.lerp_(p.grad, 1 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    p.addcdiv_(m, (v.sqrt() / c2).add_(self.eps), value=-g["lr"] / c1)


def _make_modules():
    """Torch modules, defined lazily so that importing this module does not import torch."""
    import torch
    from torch import nn

    class AttentiveNet(nn.Module):
        """Frame projection -> masked attention pooling -> linear classifier.

        ``forward(frames, mask)``: ``frames`` holds only the true frames of a batch, packed in
        row-major order of the boolean ``mask`` ``(batch, max_len)`` (i.e. ``x[mask]`` of a padded
        ``x``); padded slots are never computed, and their attention weight is exactly 0.
        """

        def __init__(self, d_in: int, hidden: int, n_classes: int, dropout: float):
            super().__init__()
            self.proj = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU())
            self.score = nn.Linear(hidden, 1)
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))

        def attention(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h_true = self.proj(frames)
            h = h_true.new_zeros(mask.shape + (h_true.shape[1],))
            h[mask] = h_true
            s = h_true.new_full(mask.shape, float("-inf"))
            s[mask] = self.score(h_true).squeeze(-1)
            return torch.softmax(s, dim=1), h

        def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            a, h = self.attention(frames, mask)
            return self.head(torch.einsum("bt,bth->bh", a, h))

    class WeightedLayersNet(nn.Module):
        """Softmax-weighted sum of (standardised) layers -> MLP (or linear) head."""

        def __init__(self, n_layers: int, d_in: int, hidden: int, n_classes: int, dropout: float):
            super().__init__()
            self.layer_logits = nn.Parameter(torch.zeros(n_layers))
            if hidden:
                self.head = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(hidden, n_classes))
            else:
                self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, n_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """``x``: layer-major ``(n_layers, batch, dim)``."""
            w = torch.softmax(self.layer_logits, dim=0)
            return self.head((w @ x.reshape(x.shape[0], -1)).view(x.shape[1], x.shape[2]))

    return AttentiveNet, WeightedLayersNet


class _TorchProbe(_ProbeBase):
    """Training loop shared by the torch probes: AdamW, class weighting, early stopping.

    Early stopping monitors the loss on an inner stratified validation split (``val_fraction``,
    grouped by speaker when ``groups`` are given and enough speakers exist, see
    :data:`MIN_VAL_GROUPS`; class-balanced when ``class_weight`` is set) and restores the best
    epoch's weights; with ``val_fraction=0`` or too few items it trains
    ``epochs`` epochs. ``n_epochs_``, ``best_epoch_`` and ``fit_seconds_`` record the run.
    """

    # subclasses: _prepare(X, fit) -> data; _build(data, n_classes) -> module;
    # _batch(data, idx) -> tuple of tensors passed to the module
    def _loop_params(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _param_groups(self, module: Any) -> list[dict]:
        return [{"params": list(module.parameters()), "weight_decay": self.weight_decay}]

    def fit(self, X: Any, y: Any, groups: Any = None) -> "_TorchProbe":
        cw = check_class_weight(self.class_weight)
        self._loop_params()
        t0 = time.perf_counter()
        data = self._prepare(X, fit=True)
        self.classes_, yi = _encode_labels(y, self._n_items(data))
        groups = _check_groups(groups, len(yi))
        n_classes = len(self.classes_)
        tr, va = validation_split(yi, groups, self.val_fraction, self.random_state)
        with _torch_scope(self.n_threads, self.random_state) as torch:
            gen = torch.Generator().manual_seed(int(self.random_state))
            module = self._build(data, n_classes).to(self.device)
            counts = np.bincount(yi[tr], minlength=n_classes).astype(np.float64)
            weights = _class_weights(cw, self.classes_, yi[tr])
            val_weights = _class_weights("balanced" if cw == "sampling" else cw, self.classes_, yi[tr])
            train_loss = torch.nn.CrossEntropyLoss(weight=_tensor(torch, weights, self.device))
            val_loss = torch.nn.CrossEntropyLoss(weight=_tensor(torch, val_weights, self.device))
            opt = _AdamW(self._param_groups(module), lr=self.lr)
            y_t = torch.as_tensor(yi, device=self.device)
            sample_p = torch.as_tensor((1.0 / np.maximum(counts, 1))[yi[tr]], dtype=torch.float64)
            best, best_state, bad, epoch = np.inf, None, 0, 0
            for epoch in range(1, self.epochs + 1):
                module.train()
                if cw == "sampling":
                    order = tr[torch.multinomial(sample_p, len(tr), replacement=True, generator=gen).numpy()]
                else:
                    order = tr[torch.randperm(len(tr), generator=gen).numpy()]
                for b in range(0, len(order), self.batch_size):
                    idx = order[b : b + self.batch_size]
                    loss = train_loss(module(*self._batch(data, idx)), y_t[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if len(va):
                    module.eval()
                    with torch.no_grad():
                        v = float(val_loss(self._logits(module, data, va), y_t[va]))
                    if v < best - 1e-4:
                        best, bad, self.best_epoch_ = v, 0, epoch
                        best_state = copy.deepcopy(module.state_dict())
                    else:
                        bad += 1
                        if bad >= self.patience:
                            break
            if best_state is not None:
                module.load_state_dict(best_state)
            else:
                self.best_epoch_ = epoch
            module.eval()
        self.module_ = module
        self.n_epochs_ = epoch
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def __getstate__(self) -> dict:
        """Pickle the trained network as its state dict (the torch classes are built lazily)."""
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__ itself
        if "module_" in state:
            state["module_"] = {k: v.detach().cpu() for k, v in state["module_"].state_dict().items()}
        return state

    def __setstate__(self, state: dict) -> None:
        weights = state.pop("module_", None)
        super().__setstate__(state)
        if weights is not None:
            module = self._build(None, len(self.classes_))
            module.load_state_dict(weights)
            self.module_ = module.to(self.device).eval()

    def _logits(self, module: Any, data: Any, idx: np.ndarray) -> Any:
        import torch

        chunks = [module(*self._batch(data, idx[b : b + 256])) for b in range(0, len(idx), 256)]
        return torch.cat(chunks)

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "module_")
        data = self._prepare(X, fit=False)
        n = self._n_items(data)
        with _torch_scope(self.n_threads, self.random_state) as torch, torch.no_grad():
            self.module_.eval()
            idx = self._predict_order(data)
            logits = self._logits(self.module_, data, idx)
            p = torch.softmax(logits.double(), dim=1).cpu().numpy()
        out = np.empty((n, p.shape[1]))
        out[idx] = p
        return out

    def _predict_order(self, data: Any) -> np.ndarray:
        return np.arange(self._n_items(data))


class AttentiveMLPProbe(_TorchProbe):
    """Attentive pooling over an item's frames + a small MLP (torch, CPU-fast).

    X: a sequence (list or 1-D object array) of ``(T_i, dim)`` float arrays. Frames are
    standardised with the training frames' mean/std, projected to ``hidden`` units (GELU), pooled
    by a learned attention whose softmax runs over the true frames only (padded slots are never
    computed and get weight 0), and classified by a linear layer (dropout before it).
    ``max_frames`` keeps at most that many centre frames per item. Defaults: ``lr=1e-3``, up to
    100 epochs, patience 10 (about 50 epochs, 2-3 s CPU, on 640 items x 5-15 frames x 768).
    """

    def __init__(self, hidden: int = 64, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 patience: int = 10, val_fraction: float = 0.15, class_weight: str | None = None,
                 batch_size: int = 64, max_frames: int | None = None, random_state: int = 0,
                 device: str = "cpu", n_threads: int | None = 1, dropout: float = 0.1):
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads
        self.dropout = dropout

    def _prepare(self, X: Any, fit: bool) -> dict:
        import torch

        if isinstance(X, np.ndarray) and X.dtype != object:
            raise ValueError("attn-mlp takes a sequence of (num_frames, dim) arrays (one per item), "
                             f"got one numeric array of shape {X.shape}")
        seqs = [np.asarray(x, dtype=np.float32) for x in X]
        if not seqs:
            raise ValueError("X holds no items")
        dim = seqs[0].shape[-1] if seqs[0].ndim == 2 else None
        for i, x in enumerate(seqs):
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != dim:
                raise ValueError(f"item {i} has frames of shape {x.shape}; every item needs a "
                                 f"(num_frames >= 1, {dim}) array")
        if self.max_frames is not None:
            m = int(self.max_frames)
            seqs = [x[(len(x) - m) // 2 : (len(x) - m) // 2 + m] if len(x) > m else x for x in seqs]
        lengths = np.array([len(x) for x in seqs], dtype=np.int64)
        flat = np.concatenate(seqs)
        if not np.isfinite(flat).all():
            raise ValueError("X holds non-finite values (NaN or inf)")
        if fit:
            self.n_features_in_ = dim
            x64 = flat.astype(np.float64)
            mean, std = x64.mean(axis=0), x64.std(axis=0)
            self.mean_, self.scale_ = mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)
        elif dim != self.n_features_in_:
            raise ValueError(f"X has {dim} features per frame, but the probe was fitted with {self.n_features_in_}")
        flat = (flat - self.mean_) / self.scale_
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return {"flat": torch.from_numpy(flat).to(self.device), "offsets": offsets, "lengths": lengths}

    @staticmethod
    def _n_items(data: dict) -> int:
        return len(data["lengths"])

    def _build(self, data: dict, n_classes: int) -> Any:
        AttentiveNet, _ = _make_modules()
        return AttentiveNet(self.n_features_in_, int(self.hidden), n_classes, float(self.dropout))

    def _batch(self, data: dict, idx: np.ndarray) -> tuple:
        """The true frames of items ``idx`` (packed) and their ``(len(idx), max_len)`` mask."""
        import torch

        lengths = data["lengths"][idx]
        mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
        starts = data["offsets"][idx]
        frame = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        frames = torch.index_select(data["flat"], 0, torch.from_numpy(frame).to(self.device))
        return frames, torch.from_numpy(mask).to(self.device)

    def _predict_order(self, data: dict) -> np.ndarray:
        return np.argsort(data["lengths"], kind="stable")  # similar lengths share a batch

    def attention_weights(self, X: Any) -> list[np.ndarray]:
        """Each item's attention over its (kept) frames, for inspection."""
        check_is_fitted(self, "module_")
        data = self._prepare(X, fit=False)
        import torch

        out = []
        with torch.no_grad():
            for i in range(self._n_items(data)):
                a, _ = self.module_.attention(*self._batch(data, np.array([i])))
                out.append(a[0].cpu().numpy())
        return out


class WeightedLayersProbe(_TorchProbe):
    """SUPERB-style probe: learned softmax weights over layers + an MLP head (``hidden=0``: linear).

    X: ``(n, n_layers, dim)`` pooled vectors (``probes.pooling.all_layers_matrix``), standardised
    per layer and dimension with training statistics. ``layer_weights_`` (summing to 1) tells
    which layers the probe used. The layer logits are not weight-decayed and learn at
    ``layer_lr_scale`` times ``lr``.
    """

    def __init__(self, hidden: int = 64, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 patience: int = 10, val_fraction: float = 0.15, class_weight: str | None = None,
                 batch_size: int = 64, random_state: int = 0, device: str = "cpu", n_threads: int | None = 1,
                 dropout: float = 0.1, layer_lr_scale: float = 10.0):
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads
        self.dropout = dropout
        self.layer_lr_scale = layer_lr_scale

    def _prepare(self, X: Any, fit: bool) -> Any:
        import torch

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 3:
            raise ValueError(f"weighted-layers takes X of shape (n_items, n_layers, dim), got {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X holds non-finite values (NaN or inf)")
        if fit:
            self.n_layers_, self.n_features_in_ = X.shape[1], X.shape[2]
            x64 = X.astype(np.float64)
            mean, std = x64.mean(axis=0), x64.std(axis=0)
            self.mean_, self.scale_ = mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)
        elif X.shape[1:] != (self.n_layers_, self.n_features_in_):
            raise ValueError(f"X has shape {X.shape}; the probe was fitted on "
                             f"(n, {self.n_layers_}, {self.n_features_in_})")
        x = np.ascontiguousarray(((X - self.mean_) / self.scale_).transpose(1, 0, 2))  # layer-major
        return torch.from_numpy(x).to(self.device)

    @staticmethod
    def _n_items(data: Any) -> int:
        return int(data.shape[1])

    def _build(self, data: Any, n_classes: int) -> Any:
        _, WeightedLayersNet = _make_modules()
        return WeightedLayersNet(self.n_layers_, self.n_features_in_, int(self.hidden), n_classes,
                                 float(self.dropout))

    def _param_groups(self, module: Any) -> list[dict]:
        head = [p for name, p in module.named_parameters() if name != "layer_logits"]
        return [{"params": head, "weight_decay": self.weight_decay},
                {"params": [module.layer_logits], "weight_decay": 0.0, "lr": self.lr * self.layer_lr_scale}]

    def _batch(self, data: Any, idx: np.ndarray) -> tuple:
        import torch

        return (torch.index_select(data, 1, torch.from_numpy(np.asarray(idx)).to(self.device)),)

    def fit(self, X: Any, y: Any, groups: Any = None) -> "WeightedLayersProbe":
        super().fit(X, y, groups)
        import torch

        with torch.no_grad():
            self.layer_weights_ = torch.softmax(self.module_.layer_logits, dim=0).cpu().numpy().astype(np.float64)
        return self


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------
_CLASSES = {"logreg": LogRegProbe, "xgb": XGBProbe, "attn-mlp": AttentiveMLPProbe,
            "weighted-layers": WeightedLayersProbe}


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise ValueError(f"unknown probe {name!r}; use one of {', '.join(PROBES)}")


def probe_input_kind(name: str) -> str:
    """``"pooled"`` (``(n, dim)``), ``"frames"`` (list of ``(T_i, dim)``) or ``"layers"`` (``(n, L, dim)``)."""
    _check_name(name)
    return PROBE_INPUT[name]


def make_probe(name: str, class_weight: str | None = None, random_state: int = 0, n_threads: int = 1,
               **params: Any) -> BaseEstimator:
    """Build probe ``name`` (see :data:`PROBES`); ``n_threads`` caps its CPU threads."""
    _check_name(name)
    cls = _CLASSES[name]
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"probe {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters are {', '.join(valid)}")
    params = dict(params, class_weight=check_class_weight(class_weight), random_state=random_state)
    if name == "xgb":
        params.setdefault("n_jobs", n_threads)
    elif name in ("attn-mlp", "weighted-layers"):
        params.setdefault("n_threads", n_threads)
    return cls(**params)


__all__ = [
    "PROBES", "CLASS_WEIGHTS", "CLASS_WEIGHT_VALUES", "C_GRID", "LogRegProbe", "XGBProbe", "AttentiveMLPProbe", "WeightedLayersProbe",
    "make_probe", "probe_input_kind", "check_class_weight", "oversample_indices",
]

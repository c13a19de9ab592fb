"""Caches derived from a store, and the versions that key them.

A finished store is immutable: nothing here writes into it. Pooled vectors are cached *beside* the
store, in a sidecar folder ``<store file>.pooled/<identity>/``, one ``.npy`` file per (scope,
pooling, layer), named after the store's content identity (:meth:`featstore.store.Store.identity`)
and a hash of the code and library versions that computed them (:func:`pooling_versions`). When
the store's folder cannot be written (a read-only store or file system), the user cache folder is
used instead (``$FEATSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featstore``, else
``~/.cache/featstore``); when neither can be written, nothing is cached and a
:class:`CacheWarning` says so once per store. Entries are written to a temporary file and renamed,
so concurrent sweeps and readers never see a half-written entry.

:func:`library_versions` (package, numpy, scipy, scikit-learn, xgboost, torch) is also part of
every sweep cell's key (``probes.sweep``): upgrading any of them refits.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from featstore.store import Store

#: bump when the meaning of a pooled entry changes (pooling arithmetic, NaN rows, ...)
POOLED_FORMAT = 2
SIDECAR_SUFFIX = ".pooled"


class CacheWarning(UserWarning):
    """Pooled vectors could not be cached (read-only locations); they are recomputed each time."""


@lru_cache(maxsize=None)
def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def library_versions() -> dict[str, str]:
    """Versions of this package and of the libraries results depend on (read from the installed
    metadata, without importing torch or xgboost)."""
    import featstore

    return {"featstore": str(getattr(featstore, "__version__", _dist_version("featstore"))),
            "numpy": _dist_version("numpy"), "scipy": _dist_version("scipy"),
            "scikit-learn": _dist_version("scikit-learn"), "xgboost": _dist_version("xgboost"),
            "torch": _dist_version("torch")}


def pooling_versions() -> dict[str, str]:
    """What a pooled vector depends on: the pooled-entry format, the package, numpy and scipy."""
    v = library_versions()
    return {"pooled_format": str(POOLED_FORMAT), "featstore": v["featstore"], "numpy": v["numpy"],
            "scipy": v["scipy"]}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def user_cache_dir() -> Path:
    """``$FEATSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/featstore``, else ``~/.cache/featstore``."""
    explicit = os.environ.get("FEATSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "featstore"


def sidecar_dir(store_path: str | os.PathLike) -> Path:
    """``<store file>.pooled`` beside the store."""
    p = Path(store_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


class PooledCache:
    """Pooled vectors of one open store, keyed by its identity and :func:`pooling_versions`."""

    _warned: set[str] = set()

    def __init__(self, store: Store):
        self.store = store
        self.identity = store.identity()
        tag = self.identity[:24]
        self.locations = [sidecar_dir(store.path) / tag, user_cache_dir() / "pooled" / tag]
        self.version_tag = _hash(pooling_versions())[:12]

    def _name(self, key: str, layer: int) -> str:
        return f"{key}-L{int(layer):02d}-{self.version_tag}.npy"

    def get(self, key: str, layer: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The cached ``(num_items, dim)`` array, or None (absent, unreadable or of another shape)."""
        for loc in self.locations:
            path = loc / self._name(key, layer)
            if not path.exists():
                continue
            try:
                values = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                continue
            if values.shape == tuple(shape) and values.dtype == np.float32:
                return values
        return None

    def put(self, key: str, layer: int, values: np.ndarray) -> Path | None:
        """Write an entry into the first writable location; None (and one warning) when none is."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        errors = []
        for loc in self.locations:
            try:
                loc.mkdir(parents=True, exist_ok=True)
                path = loc / self._name(key, layer)
                tmp = loc / f".{path.name}.tmp{os.getpid()}"
                try:
                    with open(tmp, "wb") as f:
                        np.save(f, values, allow_pickle=False)
                    os.replace(tmp, path)
                finally:
                    if tmp.exists():
                        tmp.unlink()
                self._drop_stale(loc)
                return path
            except OSError as exc:
                errors.append(f"{loc}: {exc.strerror or exc}")
        once = self.identity + str(self.locations)
        if once not in PooledCache._warned:
            PooledCache._warned.add(once)
            warnings.warn(f"pooled vectors of {self.store.path.name} are not cached (no writable cache "
                          f"location: {'; '.join(errors)}); they are recomputed on every run",
                          CacheWarning, stacklevel=3)
        return None

    def _drop_stale(self, loc: Path) -> None:
        """Beside the store, entries of an earlier content identity (a re-extracted store) go."""
        if loc.parent != sidecar_dir(self.store.path):
            return
        for other in loc.parent.iterdir():
            if other.is_dir() and other.name != loc.name:
                shutil.rmtree(other, ignore_errors=True)

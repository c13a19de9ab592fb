"""featstore: a padding-exact frozen-feature store for speech models.

Read a store with ``featstore.open(path)``; see README.md for the HDF5 layout.
"""
from featstore.store import Store, check_store, open_store

open = open_store  # noqa: A001 - the documented entry point: ``featstore.open(path)``

__all__ = ["Store", "open", "open_store", "check_store"]
__version__ = "0.1.0"

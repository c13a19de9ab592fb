"""Transitional alias: the splits live in :mod:`featstore.cv` (one module for every split)."""
from featstore.cv import *  # noqa: F401,F403
from featstore.cv import FoldError, FoldWarning, NoGroupsWarning, describe_folds, fold_ids, make_folds  # noqa: F401

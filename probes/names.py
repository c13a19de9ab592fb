"""The one place for the names a user types or reads in a table: probes, class weightings,
baselines, poolings, scopes, analysis methods and levels, and the sweep's defaults.

Every module and command takes its lists from here (``probes.sweep``, ``probes.estimators``,
``probes.pooling``, ``probes.model_io``, ``probes.report``, the CLI), so a new probe or pooling
is added once.
"""
from __future__ import annotations

#: probe names (``--probe``); see ``probes.estimators``
PROBES = ("logreg", "xgb", "attn-mlp", "weighted-layers")
#: what each probe reads: pooled vectors ``(n, dim)``, frame sequences, or ``(n, layers, dim)``
PROBE_INPUT = {"logreg": "pooled", "xgb": "pooled", "attn-mlp": "frames", "weighted-layers": "layers"}
#: class weightings (``--class-weight``): none, loss weights, balanced (over)sampling
CLASS_WEIGHTS = ("none", "balanced", "sampling")
#: baseline rows beside every result (same folds)
BASELINES = ("majority", "chance")
#: poolings of an item's frames (``--pooling``); see ``probes.pooling``
POOLINGS = ("mean", "stats", "max", "center", "first", "last")
#: what is pooled over: ``auto`` = the segment where the store has segments, else the clip
SCOPES = ("auto", "clip", "segment")
#: pooling column of the probes that pool by themselves (by input kind)
SELF_POOLING = {"frames": "attention", "layers": "mean"}

#: the default sweep grid
DEFAULT_POOLINGS = ("mean", "stats", "max", "center")
DEFAULT_PROBES = ("logreg", "xgb", "attn-mlp")
DEFAULT_CLASS_WEIGHTS = ("none", "balanced")

#: columns that identify a configuration in the sweep's tables
ID_COLUMNS = ("store", "encoder", "layer", "scope", "pooling", "probe", "class_weight")

#: ``probes analyze`` methods and representation levels
ANALYSIS_METHODS = ("svcca", "pwcca", "cka")
ANALYSIS_LEVELS = ("pooled", "center", "frames")

#: headline selection (``--nested``): ``auto`` = true nested CV over every configuration when the
#: grid is affordable, else over the logistic-regression configurations; ``all``; ``off``
NESTED_MODES = ("auto", "all", "off")


def probe_input_kind(name: str) -> str:
    """``"pooled"``, ``"frames"`` or ``"layers"``; ValueError naming the valid probes."""
    if name not in PROBE_INPUT:
        raise ValueError(f"unknown probe {name!r}; use one of {', '.join(PROBES)}")
    return PROBE_INPUT[name]


def check_names(values, allowed, what: str) -> tuple[str, ...]:
    """Validated, de-duplicated names (order kept); ValueError listing the valid ones."""
    values = tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
    if not values:
        raise ValueError(f"no {what} given; use one or more of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r}; use one or more of {', '.join(allowed)}")
    return values

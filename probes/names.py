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


# ---------------------------------------------------------------------------------------------
# What kind of store a result comes from: trained and padding-exact, a control, a padded recipe
# ---------------------------------------------------------------------------------------------
#: the ``control`` root attribute of a store extracted with seeded random weights
#: (``featstore extract --random-init SEED``, seed in ``random_init_seed``)
RANDOM_INIT = "random-init"


def _false(value) -> bool:
    """An attribute that says no (``False``, ``0``, ``"false"``); absent/None is not a no."""
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    try:
        return not bool(value)
    except (TypeError, ValueError):
        return False


def _seconds(value) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{s:.1f}" if round(s, 1) == s else f"{s:g}"


def store_tags(attrs) -> list[str]:
    """What sets a store apart from a trained, padding-exact one, in words: ``"random-init
    control"`` (root attribute ``control = "random-init"``; another non-empty ``control`` value
    is named as ``"<value> control"``) and ``"padded to 1.0 s"`` (``padding_exact = False`` with
    the ``padding_recipe`` JSON; ``", padding kept"`` when its padded frames were stored; ``"not
    padding-exact"`` when no recipe is recorded). Empty for a trained, padding-exact store."""
    import json

    attrs = attrs or {}
    tags = []
    control = str(attrs.get("control") or "").strip()
    if control:
        tags.append("random-init control" if control == RANDOM_INIT else f"{control} control")
    if _false(attrs.get("padding_exact")):
        recipe = attrs.get("padding_recipe")
        if isinstance(recipe, (str, bytes)):
            try:
                recipe = json.loads(recipe)
            except ValueError:
                recipe = None
        if isinstance(recipe, dict) and recipe.get("pad_seconds") is not None:
            tag = f"padded to {_seconds(recipe['pad_seconds'])} s"
            tags.append(tag + (", padding kept" if recipe.get("keep_padding") and not _false(recipe.get("keep_padding")) else ""))
        else:
            tags.append("not padding-exact")
    return tags


def store_label(name: str, attrs=None) -> str:
    """The one name of a store in every table, legend and title: its short name plus its tags
    (:func:`store_tags`) in brackets, e.g. ``whisper [random-init control]``, ``wavlm [padded to
    1.0 s]``; just ``name`` for a trained, padding-exact store."""
    tags = store_tags(attrs)
    return f"{name} [{'; '.join(tags)}]" if tags else str(name)

"""The one layer-spec parser of the project: ``all``, ``6``, ``0-12``, ``0-3,6``, ``-1``.

Every command that takes ``--layers`` (``featstore extract``, ``probes sweep``, ``probes analyze``,
``probes doctor``) reads the spec with these functions, so one spelling means the same layers
everywhere. It lives in ``featstore`` so that extraction can use it without an import arrow from
``featstore`` to ``probes``.

Rules:

* ``all`` (anywhere in the list, any case) or an empty spec means every layer;
* a non-negative integer ``k`` is the model layer ``k`` (``layers/kk`` in a store);
* ``a-b`` (``0 <= a <= b``) is every layer from ``a`` to ``b``, both included;
* a negative integer counts from the end of the layers that exist: ``-1`` is the last one;
* the result is sorted and without repeats.

:func:`parse_layers` turns the text into a :class:`LayerSpec` without knowing which layers exist;
:func:`resolve_layers` checks it against the layers a store (or an encoder) has. A store written
with ``--layers 0,4,8`` has the layers ``[0, 4, 8]``: ``-1`` is then layer 8, and asking for
layer 5 is an error that lists the layers it has.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["LayerSpec", "LayerSpecError", "parse_layers", "select_layers", "resolve_layers", "format_layers"]

_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_INT = re.compile(r"-?\d+")


class LayerSpecError(ValueError):
    """A layer spec that cannot be read, or that names layers that do not exist."""


@dataclass(frozen=True)
class LayerSpec:
    """A parsed spec: ``every`` layer, or explicit non-negative ``layers`` plus negative ``from_end``."""

    every: bool = False
    layers: tuple[int, ...] = ()
    from_end: tuple[int, ...] = ()

    def resolve(self, available: Sequence[int]) -> list[int]:
        return resolve_layers(self, available)


def parse_layers(spec: str | int | Iterable | LayerSpec | None) -> LayerSpec:
    """Read a spec (text such as ``"0-3,6"``, an int, a list of ints/strings, or ``None`` = all)."""
    if isinstance(spec, LayerSpec):
        return spec
    if spec is None:
        return LayerSpec(every=True)
    if isinstance(spec, bool):
        raise LayerSpecError(f"bad layer spec {spec!r}: use e.g. all, 0-12, 0-3,6 or 0,4,8")
    if isinstance(spec, int):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = spec.split(",")
    else:
        parts = [str(p) for p in spec]
    parts = [p.strip() for p in parts]
    if not any(parts):
        if isinstance(spec, str) and not spec.strip():
            return LayerSpec(every=True)
        raise LayerSpecError("empty layer spec: use e.g. all, 0-12, 0-3,6 or 0,4,8")
    pos: set[int] = set()
    neg: set[int] = set()
    for part in parts:
        if not part:
            continue
        if part.lower() == "all":
            return LayerSpec(every=True)
        m = _RANGE.fullmatch(part)
        if m:
            a, b = int(m[1]), int(m[2])
            if b < a:
                raise LayerSpecError(f"bad layer range {part!r}: use increasing non-negative layers, e.g. 0-12")
            pos.update(range(a, b + 1))
        elif _INT.fullmatch(part):
            k = int(part)
            (pos if k >= 0 else neg).add(k)
        else:
            raise LayerSpecError(f"bad layer spec {part!r}: use e.g. all, 0-12, 0-3,6 or 0,4,8")
    return LayerSpec(False, tuple(sorted(pos)), tuple(sorted(neg)))


def format_layers(ids: Sequence[int]) -> str:
    """``0..12`` for a full range, else ``0, 4, 8``."""
    ids = list(ids)
    if len(ids) >= 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids))


def select_layers(spec: str | int | Iterable | LayerSpec | None,
                  available: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(present, missing)``: the layers of ``spec`` that ``available`` holds (sorted) and those it
    lacks (negative ones that reach past the first layer are missing too)."""
    spec = parse_layers(spec)
    have = sorted(int(k) for k in available)
    if spec.every:
        return have, []
    present = {k for k in spec.layers if k in have}
    missing = [k for k in spec.layers if k not in have]
    for k in spec.from_end:
        if -k > len(have):
            missing.append(k)
        else:
            present.add(have[k])
    return sorted(present), missing


def resolve_layers(spec: str | int | Iterable | LayerSpec | None, available: Sequence[int],
                   what: str = "the store") -> list[int]:
    """The layers of ``spec`` among ``available`` (sorted); :class:`LayerSpecError` for a layer
    that does not exist (the message lists the ones that do)."""
    present, missing = select_layers(spec, available)
    if missing:
        have = sorted(int(k) for k in available)
        raise LayerSpecError(f"layer {', '.join(map(str, missing))} does not exist: {what} has layers "
                             f"{format_layers(have)}")
    return present

"""What a doctor run returns: one :class:`Step` verdict per step, in order, in a :class:`DoctorReport`.

Also the step names (:data:`STEPS`), which earlier step explains a later failure
(:data:`DEPENDS`), and the user-error exception :class:`DoctorError`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STATUSES = (PASS, WARN, FAIL, SKIP)
STEPS = (
    "data sanity", "confounds", "fold sanity", "features and alignment", "label-shuffle control",
    "padding and pooling", "layer profile", "class imbalance",
)
#: earlier steps whose failure explains a later step's failure (in order of precedence)
DEPENDS: dict[str, tuple[str, ...]] = {
    "confounds": ("data sanity",),
    "fold sanity": ("data sanity",),
    "features and alignment": ("data sanity",),
    "label-shuffle control": ("data sanity", "features and alignment", "fold sanity"),
    "padding and pooling": ("data sanity", "features and alignment", "label-shuffle control"),
    "layer profile": ("data sanity", "features and alignment", "label-shuffle control", "padding and pooling"),
    "class imbalance": ("data sanity", "features and alignment", "label-shuffle control", "padding and pooling"),
}


class DoctorError(ValueError):
    """Doctor cannot run with these inputs (a user error: missing file, bad option)."""


def rounded(x: Any, digits: int = 3) -> Any:
    """Evidence for JSON: floats rounded (NaN/inf -> None), numpy scalars -> python."""
    if isinstance(x, Mapping):
        return {str(k): rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else round(float(x), digits)
    return x


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


@dataclass(frozen=True)
class Step:
    """The verdict of one step: ``status`` in pass/warn/fail/skip, ``evidence`` numbers (rounded on
    creation), a message in plain words, one line of advice, and the earlier step that caused a
    failure (or None)."""

    name: str
    status: str
    evidence: dict = field(default_factory=dict)
    message: str = ""
    advice: str = ""
    caused_by: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        object.__setattr__(self, "evidence", rounded(self.evidence))


def upstream_failure(name: str, done: Mapping[str, Step]) -> str | None:
    """The first earlier step (of :data:`DEPENDS`) that failed, or was skipped without a cause."""
    for dep in DEPENDS.get(name, ()):
        s = done.get(dep)
        if s is not None and s.status in (FAIL, SKIP) and (s.status == FAIL or s.caused_by is None):
            return dep
    return None


def with_cause(step: Step, done: Mapping[str, Step]) -> Step:
    """``step`` with ``caused_by`` filled from :func:`upstream_failure` when it did not name one."""
    if step.status in (FAIL, WARN, SKIP) and step.caused_by is None:
        cause = upstream_failure(step.name, done)
        if cause is not None:
            return Step(step.name, step.status, step.evidence, step.message, step.advice, cause)
    return step


class DoctorReport(list):
    """The steps in order (a list of :class:`Step`) plus the run's context.

    ``store``/``baseline``/``padded``: paths; ``best``: the best configuration found (layer, pooling,
    scope, scores); ``notes``: things the run adapted; ``out_dir``: where :func:`write_report` put
    ``doctor.md``; ``figures``: PNG paths; ``profile``: the numbers behind the layer-profile plot.
    """

    def __init__(self, steps: Sequence[Step] = (), store: str = "", baseline: str | None = None,
                 padded: str | None = None):
        super().__init__(steps)
        self.store = store
        self.baseline = baseline
        self.padded = padded
        self.best: dict = {}
        self.notes: list[str] = []
        self.out_dir: Path | None = None
        self.figures: dict[str, Path] = {}
        self.seconds = 0.0
        self.profile: dict = {}

    def step(self, name: str) -> Step:
        for s in self:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def failed(self) -> list[Step]:
        return [s for s in self if s.status == FAIL]

    @property
    def exit_code(self) -> int:
        """1 when any step failed, else 0 (usable to gate scripts)."""
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return {
            "store": self.store, "baseline": self.baseline, "padded": self.padded, "best": self.best,
            "notes": self.notes, "seconds": round(self.seconds, 2), "exit_code": self.exit_code,
            "steps": [asdict(s) for s in self],
            "figures": {k: str(v) for k, v in self.figures.items()},
        }

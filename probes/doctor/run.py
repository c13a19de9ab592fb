"""Run the eight steps in order on one store (:func:`run_doctor`).

The store is read once into a frozen :class:`~probes.doctor.view.View`; each step is a function
``run(view, done) -> Step`` of that view and of the verdicts before it (read-only). A step that
fails or warns because an earlier one failed names it in ``caused_by``.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Sequence

from featstore.store import missing_store_message, open_store
from probes.doctor import (alignment, confounds, data_sanity, fold_sanity, imbalance, layer_profile, padding,
                           shuffle_control)
from probes.doctor.plot import profile_data
from probes.doctor.report import write_report
from probes.doctor.result import SKIP, STEPS, DoctorError, DoctorReport, Step, with_cause
from probes.doctor.view import check_paired, prepare_view, read_table

#: steps 2-8 in order (step 1, data sanity, reads the items table before the view exists)
AFTER_VIEW = (confounds, fold_sanity, alignment, shuffle_control, padding, layer_profile, imbalance)
assert tuple(m.NAME for m in (data_sanity, *AFTER_VIEW)) == STEPS


def run_doctor(
    store_path: str | Path,
    baseline: str | Path | None = None,
    out_dir: str | Path | None = None,
    layers=None,
    n_permutations: int = 100,
    cv: int = 5,
    seed: int = 0,
    progress: bool = True,
    padded: str | Path | None = None,
) -> DoctorReport:
    """Run the eight steps on a store and write ``doctor.md``, ``doctor.json`` and figures.

    ``baseline``: an acoustic store (e.g. log-Mel) of the same items for step 7; ``padded``: a store
    of the same items written by the common padded recipe, measured in step 6 instead of the
    simulation; ``out_dir`` default ``cache/doctor/<store stem>/``; ``layers`` a layer spec (``None``/``"all"`` = every stored layer, ``"0-4,-1"``, a list);
    ``n_permutations`` label shuffles for steps 2, 4 and 5; ``cv`` speaker-grouped folds. Raises
    :class:`DoctorError` for user errors (missing file, bad option).
    """
    store_path = Path(store_path)
    if not store_path.exists():
        raise DoctorError(missing_store_message(store_path))
    for what, p in (("baseline", baseline), ("padded", padded)):
        if p is not None and not Path(p).exists():
            msg = missing_store_message(p)
            raise DoctorError(f"{what} store: {msg}" if not msg.startswith("no store") else f"no {what} store at {p}")
        if p is not None:
            check_paired(Path(p), what)
    if cv < 2:
        raise DoctorError(f"cv must be at least 2, got {cv}")
    if n_permutations < 0:
        raise DoctorError(f"n_permutations must be 0 or more, got {n_permutations}")
    if layers is not None and not isinstance(layers, (str, int)) and not hasattr(layers, "every") and not len(layers):
        raise DoctorError("layers is empty")
    from threadpoolctl import threadpool_limits

    log = _logger(progress)
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):  # many small fits: one BLAS thread is faster and never oversubscribes
        report = _run(store_path, None if baseline is None else Path(baseline),
                      None if padded is None else Path(padded), layers, n_permutations, cv, seed, log)
    report.seconds = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else Path("cache") / "doctor" / store_path.stem
    write_report(report, out)
    return report


def _run(path: Path, baseline: Path | None, padded: Path | None, layers, n_perm: int, cv: int, seed: int,
         log: Callable[[str], None]) -> DoctorReport:
    report = DoctorReport(store=str(path), baseline=None if baseline is None else str(baseline),
                          padded=None if padded is None else str(padded))
    done: dict[str, Step] = {}
    try:
        store = open_store(path)
    except (OSError, ValueError) as exc:
        raise DoctorError(str(exc)) from None
    with store:
        log(f"1/8 {data_sanity.NAME}")
        table = read_table(store, layers, cv, seed)
        step, can_run = data_sanity.run(table)
        done[step.name] = step
        view = None
        if can_run:
            view = prepare_view(store, table, n_perm, baseline, padded, log)
            report.notes.extend(view.notes)
    if view is None:
        _skip_rest(done, "the data cannot be cross-validated", data_sanity.NAME)
    elif view.fatal:
        log(f"4/8 {alignment.NAME}")
        done[alignment.NAME] = with_cause(alignment.run(view, MappingProxyType(done)), done)
        _skip_rest(done, "no usable features", alignment.NAME)
    else:
        for i, module in enumerate(AFTER_VIEW, 2):
            log(f"{i}/8 {module.NAME}")
            step = module.run(view, MappingProxyType(dict(done)))
            done[step.name] = with_cause(step, done)
        screen = view.screen
        report.best = {"layer": screen.best[0], "pooling": screen.best[1], "scope": view.scope, "probe": "logreg",
                       "balanced_accuracy": round(screen.best_score, 4),
                       "screen_balanced_accuracy": round(screen.scores[screen.best], 4),
                       "chance": round(view.chance, 4)}
        report.profile = profile_data(view, done[layer_profile.NAME])
    report.extend(done[name] for name in STEPS)
    return report


def _skip_rest(done: dict[str, Step], reason: str, cause: str) -> None:
    for name in STEPS:
        if name not in done:
            done[name] = Step(name, SKIP, {}, f"not run: {reason}", f"fix '{cause}' first", cause)


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(f"[dim]doctor: {msg}[/]", highlight=False)

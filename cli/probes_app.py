"""`probes` command line: sweep, report, fit, predict (more commands register on the same ``app``)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Probe a feature store: which layer and pooling hold the label?")
console = Console(stderr=True)

EXIT_USAGE = 2
MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt")


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """One red line, no traceback."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into :func:`fail` (set PROBES_DEBUG=1 for the traceback)."""
    from probes.model_io import BundleMismatch
    from probes.sweep import SweepError

    try:
        yield
    except (SweepError, BundleMismatch, FileNotFoundError, ValueError, KeyError) as exc:
        if os.environ.get("PROBES_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        fail(str(msg))


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _existing(path: Path, what: str = "store") -> Path:
    if not path.exists():
        fail(f"no {what} at {path}")
    return path


@app.command()
def sweep(
    files: List[Path] = typer.Argument(..., metavar="FILE", help="One or more store files (several -> one table)."),
    layers: str = typer.Option("all", help="Layers: all, 0-12, 0-3,6."),
    scope: str = typer.Option("auto", help="auto (segment where the store has one, else clip), clip, segment."),
    pooling: str = typer.Option("mean,stats,max,center", help="Poolings for pooled-input probes: mean,stats,max,center,first,last."),
    probe: str = typer.Option("logreg,xgb,attn-mlp", help="Probes: logreg, xgb, attn-mlp, weighted-layers."),
    class_weight: str = typer.Option("none,balanced", help="Class weightings: none, balanced, sampling."),
    cv: int = typer.Option(5, help="Outer folds (speaker-grouped when the store has speakers)."),
    n_jobs: int = typer.Option(-1, help="Parallel workers (-1 = all cores)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default cache/sweeps/<store name>)."),
    seed: int = typer.Option(0, help="Seed of folds, probes and bootstrap."),
    label_map: Optional[str] = typer.Option(None, help="Binary screening view, e.g. Lateral:Disordered,Interdental:Disordered."),
    speaker_zscore: bool = typer.Option(False, help="Standardise features per speaker (label-free, transductive)."),
    backend: str = typer.Option("loky", help="joblib backend (loky, threading, dask...)."),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler address (tcp://host:8786): run cells on that cluster."),
    n_boot: int = typer.Option(1000, help="Speaker-bootstrap resamples for confidence intervals."),
    report: bool = typer.Option(True, help="Write plots and report.md after the sweep."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Layer x pooling x probe x class weighting, cross-validated against the baselines of the same folds."""
    from probes.sweep import parse_layers, run_sweep

    for f in files:
        _existing(f)
    with user_errors():
        layer_list = parse_layers(layers)
        kwargs = dict(
            layers=layer_list, scope=scope, poolings=_csv(pooling), probes=_csv(probe),
            class_weights=_csv(class_weight), cv=cv, n_jobs=n_jobs, out_dir=out, seed=seed,
            label_map=label_map, speaker_zscore=speaker_zscore, backend=backend, progress=progress, n_boot=n_boot,
        )
        if scheduler:
            import joblib

            try:
                from dask.distributed import Client
            except ImportError:
                fail("--scheduler needs dask[distributed]: pip install 'featstore[dask]'")
            try:
                client = Client(scheduler, timeout=10)
            except (OSError, TimeoutError) as exc:
                fail(f"cannot reach the dask scheduler at {scheduler}: {exc}")
            with client, joblib.parallel_config(backend="dask"):
                result = run_sweep(files, **{**kwargs, "backend": None})
        else:
            result = run_sweep(files, **kwargs)
        if report:
            from probes.report import write_report

            path = write_report(result.out_dir)
            console.print(f"report: {path}", highlight=False)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="A sweep output directory.")) -> None:
    """Write the plots (PNG) and report.md of a finished sweep."""
    from probes.report import write_report

    _existing(out_dir, "sweep directory")
    with user_errors():
        path = write_report(out_dir)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def fit(
    file: Path = typer.Argument(..., help="Store to train on (all labelled items)."),
    layer: str = typer.Option(..., help="Layer index, or 'all' for weighted-layers."),
    pooling: str = typer.Option("mean", help="Pooling (ignored by attn-mlp and weighted-layers)."),
    probe: str = typer.Option("logreg", help="logreg, xgb, attn-mlp, weighted-layers."),
    class_weight: str = typer.Option("none", help="none, balanced, sampling."),
    scope: str = typer.Option("auto", help="auto, clip, segment."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (joblib)."),
    cv_score: Optional[float] = typer.Option(None, help="CV score to record with the model (e.g. from summary.csv)."),
    seed: int = typer.Option(0, help="Seed of the probe."),
) -> None:
    """Train one configuration on the whole store and save it with its provenance."""
    from probes.model_io import fit_final
    from probes.pooling import POOLINGS
    from probes.sweep import CLASS_WEIGHTS, PROBES

    _existing(file)
    if probe not in PROBES:
        fail(f"unknown probe {probe!r}; use one of {', '.join(PROBES)}")
    if pooling not in POOLINGS:
        fail(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if class_weight not in CLASS_WEIGHTS:
        fail(f"unknown class weight {class_weight!r}; use one of {', '.join(CLASS_WEIGHTS)}")
    with user_errors():
        bundle = fit_final(file, layer, pooling, probe, class_weight, scope, out=out, cv_score=cv_score, seed=seed)
    console.print(
        f"saved {out}: {bundle['probe']} on layer {bundle['layer']} ({bundle['pooling']}, {bundle['scope']}) of "
        f"{bundle['encoder']}, {bundle['n_train']} items, classes {', '.join(bundle['classes'])}", highlight=False)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model file written by `probes fit`."),
    file: Path = typer.Argument(..., help="A store, or a manifest (CSV/TSV) to extract first."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV to write (default: print CSV to stdout)."),
) -> None:
    """Label a store's items (id, pred, proba_<class>); refuses features of another encoder."""
    from probes.model_io import load_bundle, predict_store

    _existing(model, "model")
    _existing(file, "store or manifest")
    with user_errors():
        bundle = load_bundle(model)
        store = file
        if file.is_dir() or file.suffix.lower() in MANIFEST_SUFFIXES:
            try:
                from featstore.extract import extract_for_predict
            except ImportError:
                fail("predicting from a manifest needs featstore.extract.extract_for_predict, which this "
                     "installation lacks; extract a store with `featstore extract` and pass the store")
            store = extract_for_predict(file, bundle["encoder"])
            store = getattr(store, "path", store)
        df = predict_store(bundle, store)
    if out is None:
        typer.echo(df.to_csv(index=False), nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        counts = df.loc[df["pred"] != "", "pred"].value_counts()
        console.print(f"wrote {out}: {len(df)} items; " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


from cli.analyze_cmd import analyze  # noqa: E402 - command modules register on this app
from cli.doctor_cmd import doctor  # noqa: E402

app.command("doctor")(doctor)
app.command("analyze")(analyze)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

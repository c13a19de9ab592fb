"""`probes` command line: sweep, report, fit, predict, analyze, doctor.

Each command parses its options, calls one library function and prints; errors go through
:mod:`featstore_cli.errors` (one red line, exit code 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .errors import console, csv_list, existing, fail, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Probe a feature store: which layer and pooling hold the label?")

MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt")


@app.command()
def sweep(
    files: List[Path] = typer.Argument(..., metavar="FILE", help="One or more store files (several -> one table)."),
    layers: str = typer.Option("all", help="Layers: all, 0-12, 0-3,6, -1 (the last)."),
    scope: str = typer.Option("auto", help="auto (segment where the store has one, else clip), clip, segment."),
    pooling: str = typer.Option("mean,stats,max,center", help="Poolings for pooled-input probes: mean,stats,max,center,first,last."),
    probe: str = typer.Option("logreg,xgb,attn-mlp", help="Probes: logreg, xgb, attn-mlp, weighted-layers."),
    class_weight: str = typer.Option("none,balanced", help="Class weightings: none, balanced, sampling."),
    cv: int = typer.Option(5, help="Outer folds (speaker-grouped when the store has speakers)."),
    nested: str = typer.Option("auto", help="Headline by true nested CV over: auto (every configuration when "
                               "affordable, else the logreg ones), all, a list of probes (logreg,xgb), or off "
                               "(selection on the other outer folds, not nested)."),
    inner_cv: int = typer.Option(3, help="Inner folds of the nested headline (inside each outer training part)."),
    n_jobs: int = typer.Option(-1, help="Parallel workers (-1 = all cores)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default cache/sweeps/<store name>)."),
    seed: int = typer.Option(0, help="Seed of folds, probes and bootstrap."),
    label_map: Optional[str] = typer.Option(None, help="Binary screening view, e.g. Lateral:Disordered,Interdental:Disordered."),
    speaker_zscore: bool = typer.Option(False, help="Standardise features per speaker (label-free, transductive)."),
    backend: str = typer.Option("loky", help="joblib backend (loky, threading, dask...)."),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler address (tcp://host:8786): run cells on that cluster."),
    n_boot: int = typer.Option(1000, help="Speaker-bootstrap resamples for confidence intervals."),
    report: bool = typer.Option(True, help="Write plots, report.md and report.html after the sweep."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Layer x pooling x probe x class weighting, cross-validated against the baselines of the same folds."""
    from probes.report import write_report
    from probes.sweep import run_sweep

    with user_errors():
        result = run_sweep(
            files, layers=layers, scope=scope, poolings=csv_list(pooling), probes=csv_list(probe),
            class_weights=csv_list(class_weight), cv=cv, n_jobs=n_jobs, out_dir=out, seed=seed,
            label_map=label_map, speaker_zscore=speaker_zscore, backend=backend, progress=progress, n_boot=n_boot,
            nested=nested, inner_cv=inner_cv, scheduler=scheduler,
        )
        if report:
            md = write_report(result.out_dir)
            console.print(f"report: {md} and {md.with_name('report.html')}", highlight=False)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="A sweep output directory.")) -> None:
    """Write the plots (PNG), report.md and report.html (one self-contained page) of a finished sweep."""
    from probes.report import write_report

    with user_errors():
        path = write_report(out_dir)
    console.print(f"wrote {path} and {path.with_name('report.html')}", highlight=False)


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

    existing(file)
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
    from probes.model_io import load_bundle, predict_store, write_predictions

    existing(file, "store or manifest")
    with user_errors():
        bundle = load_bundle(model)
        store = file
        if file.is_dir() or file.suffix.lower() in MANIFEST_SUFFIXES:
            store = _extract_for_predict(file, bundle["encoder"])
        df = predict_store(bundle, store)
        if out is not None:
            write_predictions(df, out)
    if out is None:
        typer.echo(df.to_csv(index=False), nl=False)
    else:
        counts = df.loc[df["pred"] != "", "pred"].value_counts()
        console.print(f"wrote {out}: {len(df)} items; " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


def _extract_for_predict(manifest: Path, encoder: str) -> Path:
    """Extraction lives in ``featstore`` (``probes`` never imports it); the CLI joins the two."""
    try:
        from featstore.extract import extract_for_predict
    except ImportError:
        fail("predicting from a manifest needs featstore.extract.extract_for_predict, which this "
             "installation lacks; extract a store with `featstore extract` and pass the store")
    store = extract_for_predict(manifest, encoder)
    return getattr(store, "path", store)


from .analyze_cmd import analyze  # noqa: E402 - command modules register on this app
from .doctor_cmd import doctor  # noqa: E402

app.command("doctor")(doctor)
app.command("analyze")(analyze)


def main() -> None:
    from .errors import run_console_script

    run_console_script(app)


if __name__ == "__main__":
    main()

"""Every figure at 1, 5, 13 and 25 layers, from the real commands (sweep + report, doctor,
analysis) on a trained store, a random-init control and a padded-recipe store: integer layer ticks
(at most 13 labelled), one-layer stores drawn as labelled points or bars (sane x-limits), stored
layer ids on the axis, legends naming the control, the padded store and the baselines.

The figures are caught as the code saves them (``Figure.savefig``), so the tests inspect the
matplotlib objects behind each PNG.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from probes.analysis import run_analysis
from probes.doctor import run_doctor
from probes.names import store_label, store_tags
from probes.plots import MAX_TICKS, layer_ticks
from probes.report import write_report
from probes.sweep import run_sweep
from tests.labelled_stores import CONTROL, PADDED, write_store

COUNTS = (1, 5, 13, 25)
CONTROL_LABEL, PADDED_LABEL = "random-init control", "padded to 1.0 s"


def catch_figures(monkeypatch) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    save = Figure.savefig

    def record(self, fname, *args, **kwargs):
        figures[Path(fname).name] = self
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def methods(n_layers: int) -> tuple[str, ...]:
    return ("svcca", "cka") if n_layers == 1 else ("cka",)


def poolings(n_layers: int) -> tuple[str, ...]:
    """Two poolings where the sweep is cheap, one on 13 and 25 layers (keeps the suite fast)."""
    return ("mean", "stats") if n_layers <= 5 else ("mean",)


def make_run(root: Path, layer_ids: list[int], nested: str | None = None, doctor_padded: bool | None = None) -> dict:
    """Stores, a sweep with its report, a doctor run and an analysis at these layer ids (by
    default the nested headline and SVCCA only on one layer, where they are cheap, and the doctor's
    measured padding step on 1 and 13 layers)."""
    n = len(layer_ids)
    nested = nested or ("auto" if n == 1 else "off")
    doctor_padded = n in (1, 13) if doctor_padded is None else doctor_padded
    trained = write_store(root / "trained.h5", layer_ids, seed=1)
    control = write_store(root / "control.h5", layer_ids, CONTROL, cue={}, seed=2)
    padded = write_store(root / "padded.h5", layer_ids, PADDED, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        figures = catch_figures(mp)
        sweep = run_sweep([trained, control, padded], probes=("logreg",), poolings=poolings(n),
                          class_weights=("none",), cv=3, n_jobs=1, out_dir=root / "sweep", n_boot=20,
                          nested=nested, progress=False, quiet=True)
        write_report(sweep.out_dir)
        sweep_figs = dict(figures)
        figures.clear()
        doctor = run_doctor(trained, baseline=control, padded=padded if doctor_padded else None,
                            out_dir=root / "doctor", n_permutations=4, cv=3, progress=False)
        doctor_figs = dict(figures)
        figures.clear()
        analysis = run_analysis([trained, control], methods=methods(n), n_boot=4,
                                n_shuffle=2, out=root / "analysis", n_jobs=1)
        analysis_figs = dict(figures)
    return dict(layers=layer_ids, sweep=sweep, doctor=doctor, analysis=analysis, sweep_figs=sweep_figs,
                doctor_figs=doctor_figs, analysis_figs=analysis_figs, root=root)


@pytest.fixture(scope="module", params=COUNTS, ids=lambda n: f"{n}layers")
def run(request, tmp_path_factory) -> dict:
    return make_run(tmp_path_factory.mktemp(f"fig{request.param}"), list(range(request.param)))


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> dict:
    """A store extracted with layers 0, 4, 8."""
    return make_run(tmp_path_factory.mktemp("sparse"), [0, 4, 8])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _visible(ax, axis: str, values) -> np.ndarray:
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    values = np.asarray(values, dtype=float)
    return (values >= lo - 1e-9) & (values <= hi + 1e-9)


def labelled_ticks(ax, axis: str = "x") -> list[str]:
    """The texts of the labelled ticks inside the axis limits (the ones drawn)."""
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    keep = _visible(ax, axis, [t.get_position()[0 if axis == "x" else 1] for t in ticks])
    return [t.get_text() for t, k in zip(ticks, keep) if k and t.get_text()]


def assert_layer_axis(ax, layers: list[int], axis: str = "x") -> None:
    """Integer tick values, at most MAX_TICKS labelled, every label an integer layer id (ticks
    drawn inside the axis limits)."""
    values = ax.get_xticks() if axis == "x" else ax.get_yticks()
    values = values[_visible(ax, axis, values)]
    assert len(values) <= MAX_TICKS, values
    assert np.allclose(values, np.round(values)), values
    labels = labelled_ticks(ax, axis)
    assert labels and all(re.fullmatch(r"\d+", t) for t in labels), labels
    assert set(int(t) for t in labels) <= set(layers)
    assert int(labels[0]) == layers[0]


def legend_texts(fig: Figure) -> list[str]:
    texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    for ax in fig.axes:
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    return texts


def data_axes(fig: Figure) -> list:
    """The plotting axes (colour bars left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def line_xs(ax) -> list[list[float]]:
    """x data of the lines drawn in data coordinates with two or more points (reference lines
    such as axhline, drawn in axes coordinates, left out)."""
    return [list(np.asarray(l.get_xdata(), dtype=float)) for l in ax.get_lines()
            if l.get_transform() is ax.transData and len(l.get_xdata()) >= 2]


# ---------------------------------------------------------------------------------------------
# tick choice and labels
# ---------------------------------------------------------------------------------------------
def test_layer_ticks_integers_and_at_most_13():
    assert layer_ticks([0]) == [0]
    assert layer_ticks(range(13)) == list(range(13))
    assert layer_ticks(range(25)) == list(range(0, 25, 2))
    assert layer_ticks([0, 4, 8]) == [0, 4, 8]
    assert len(layer_ticks(range(100))) <= 13 and layer_ticks(range(100))[:2] == [0, 8]


@pytest.mark.parametrize("attrs, label", [
    ({"padding_exact": True}, "whisper"),
    ({}, "whisper"),
    ({"control": "", "padding_exact": True}, "whisper"),
    ({"control": "random-init", "random_init_seed": 3, "padding_exact": True}, "whisper [random-init control]"),
    ({"padding_exact": False, "padding_recipe": '{"pad_seconds": 1.0, "keep_padding": false}'}, "whisper [padded to 1.0 s]"),
    ({"padding_exact": np.bool_(False), "padding_recipe": {"pad_seconds": 2, "keep_padding": True}},
     "whisper [padded to 2.0 s, padding kept]"),
    ({"padding_exact": "false"}, "whisper [not padding-exact]"),
    ({"control": "random-init", "padding_exact": False, "padding_recipe": {"pad_seconds": 0.75}},
     "whisper [random-init control; padded to 0.75 s]"),
])
def test_store_label(attrs, label):
    assert store_label("whisper", attrs) == label
    assert bool(store_tags(attrs)) == (label != "whisper")


# ---------------------------------------------------------------------------------------------
# sweep figures: geometry (layer axis, one-layer drawing, artists)
# ---------------------------------------------------------------------------------------------
def test_sweep_layer_curves(run):
    layers, figs = run["layers"], run["sweep_figs"]
    assert {"layers_trained.png", "layers_control.png", "layers_padded.png"} <= set(figs)
    for store in ("trained", "control", "padded"):
        (ax,) = data_axes(figs[f"layers_{store}.png"])
        if len(layers) == 1:
            # one point per probe/pooling with its interval and value, on a categorical axis
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert len(bars) == 1 and len(bars[0].lines[0].get_xdata()) == 2
            assert labelled_ticks(ax) == [f"logreg/{p}" for p in poolings(1)]
            lo, hi = ax.get_xlim()
            assert hi - lo >= 1.5, (lo, hi)
            assert "layer 0" in ax.get_xlabel()
            values = run["sweep"].summary.query(f"store == '{store}' and probe == 'logreg'").sort_values("pooling")
            assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in values["balanced_accuracy_mean"]]
        else:
            assert_layer_axis(ax, layers)
            xs = line_xs(ax)
            n_pool = len(poolings(len(layers)))
            assert len(xs) == n_pool and all(x == [float(k) for k in layers] for x in xs)  # one line per pooling
            assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == n_pool  # CI bands
            lo, hi = ax.get_xlim()
            assert lo < layers[0] < layers[-1] < hi and hi - lo < layers[-1] - layers[0] + 2


def test_sweep_store_comparison(run):
    layers, figs = run["layers"], run["sweep_figs"]
    assert "stores.png" in figs  # several stores: drawn side by side
    (ax,) = data_axes(figs["stores.png"])
    if len(layers) == 1:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 3 and all(len(b) == 1 for b in bars)
        ticks = labelled_ticks(ax)
        assert any(CONTROL_LABEL in t for t in ticks) and any(PADDED_LABEL in t for t in ticks)
        assert ax.get_xlim()[1] - ax.get_xlim()[0] >= 2.5
    else:
        assert_layer_axis(ax, layers)
        assert len(line_xs(ax)) == 3


def test_sweep_heatmap(run):
    layers, fig = run["layers"], run["sweep_figs"]["heatmap_control.png"]
    ax = data_axes(fig)[0]
    assert_layer_axis(ax, layers, "y")
    assert len(ax.texts) == len(poolings(len(layers))) * len(layers)  # every cell annotated
    assert labelled_ticks(ax) == list(poolings(len(layers)))


def test_sweep_confusion(run):
    fig = run["sweep_figs"]["confusion_best.png"]
    ax = data_axes(fig)[0]
    assert len(ax.texts) == 9 and labelled_ticks(ax) == ["a", "b", "c"]
    best = run["sweep"].best["naive_best"]
    assert best["config"] in ax.get_title()


def test_sparse_layer_ids_plot_at_their_ids(sparse_run):
    figs = sparse_run["sweep_figs"]
    (ax,) = data_axes(figs["layers_trained.png"])
    assert all(x == [0.0, 4.0, 8.0] for x in line_xs(ax))
    assert labelled_ticks(ax) == ["0", "4", "8"]
    assert labelled_ticks(data_axes(figs["heatmap_trained.png"])[0], "y") == ["0", "4", "8"]
    prof = data_axes(sparse_run["doctor_figs"]["layer_profile.png"])[0]
    assert labelled_ticks(prof) == ["0", "4", "8"] and all(x == [0.0, 4.0, 8.0] for x in line_xs(prof))
    an = data_axes(sparse_run["analysis_figs"]["profile_trained.png"])[0]
    assert labelled_ticks(an) == ["0", "4", "8"]
    sim = data_axes(sparse_run["analysis_figs"]["similarity_trained_control_cka.png"])[0]
    assert labelled_ticks(sim, "x") == ["0", "4", "8"] and labelled_ticks(sim, "y") == ["0", "4", "8"]


# ---------------------------------------------------------------------------------------------
# doctor: geometry
# ---------------------------------------------------------------------------------------------
def test_doctor_layer_profile(run):
    layers, fig = run["layers"], run["doctor_figs"]["layer_profile.png"]
    (ax,) = data_axes(fig)
    best = run["doctor"].best
    if len(layers) == 1:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 1 and len(bars[0]) == 2
        assert labelled_ticks(ax) == ["mean pooling", "stats pooling"]
        assert ax.get_xlim()[1] - ax.get_xlim()[0] >= 1.5
    else:
        assert_layer_axis(ax, layers)
        assert sum(x == [float(k) for k in layers] for x in line_xs(ax)) == 2
        star = [l for l in ax.get_lines() if l.get_marker() == "*"]
        assert len(star) == 1 and star[0].get_xdata()[0] == best["layer"]


# ---------------------------------------------------------------------------------------------
# analysis: geometry
# ---------------------------------------------------------------------------------------------
def test_analysis_profile(run):
    layers, figs = run["layers"], run["analysis_figs"]
    axes = data_axes(figs["profile_control.png"])
    assert [ax.get_title().split(" - ")[-1] for ax in axes] == list(methods(len(layers)))
    for ax in axes:
        if len(layers) == 1:
            assert labelled_ticks(ax) == ["label", "group"]
            assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 4  # 2 targets x (score, floor)
            assert ax.get_xlim()[1] - ax.get_xlim()[0] >= 1.5
        else:
            assert_layer_axis(ax, layers)
            assert len(line_xs(ax)) == 4 and all(x == [float(k) for k in layers] for x in line_xs(ax))


def test_analysis_similarity(run):
    layers, figs = run["layers"], run["analysis_figs"]
    ax = data_axes(figs["similarity_trained_control_cka.png"])[0]
    assert_layer_axis(ax, layers, "x")
    assert_layer_axis(ax, layers, "y")
    assert ax.get_images()[0].get_array().shape == (len(layers), len(layers))
    assert len(ax.texts) == (len(layers) ** 2 if len(layers) <= MAX_TICKS else 0)
    m = run["analysis"].similarity[("trained", "control", "cka")][0]
    if len(layers) == 1:
        assert ax.texts[0].get_text() == f"{m[0, 0]:.2f}"


# ---------------------------------------------------------------------------------------------
# every figure: titles and legends name the control, the padded store and the baselines
# ---------------------------------------------------------------------------------------------
def test_sweep_legends_and_titles(run):
    figs = run["sweep_figs"]
    for store, tag in (("trained", None), ("control", CONTROL_LABEL), ("padded", PADDED_LABEL)):
        fig = figs[f"layers_{store}.png"]
        title = fig.get_suptitle()
        assert store in title and (tag is None or f"{store} [{tag}]" in title), title
        texts = legend_texts(fig)
        assert "majority baseline" in texts and "chance baseline" in texts, texts
        heat = data_axes(figs[f"heatmap_{store}.png"])[0].get_title()
        assert tag is None or f"{store} [{tag}]" in heat, heat
    texts = legend_texts(figs["stores.png"])
    assert any(f"control [{CONTROL_LABEL}]" in t for t in texts), texts
    assert any(f"padded [{PADDED_LABEL}]" in t for t in texts), texts
    assert "majority baseline" in texts and "chance baseline" in texts


def test_doctor_legend_and_title(run):
    fig = run["doctor_figs"]["layer_profile.png"]
    texts = legend_texts(fig)
    assert "chance" in texts and "shuffled labels, 95th pct" in texts
    assert any(t.startswith(f"baseline control [{CONTROL_LABEL}]") for t in texts), texts
    assert data_axes(fig)[0].get_title() == "layer profile: trained"


def test_analysis_legends_and_titles(run):
    layers, figs = run["layers"], run["analysis_figs"]
    fig = figs["profile_control.png"]
    assert f"control [{CONTROL_LABEL}]" in fig.get_suptitle() + " ".join(ax.get_title() for ax in fig.axes)
    texts = legend_texts(fig)
    if len(layers) == 1:
        assert {"label, 95 % CI (speaker bootstrap)", "shuffled floor (2.5-97.5 %)"} <= set(texts), texts
    else:
        assert {"label", "label (shuffled)", "group", "group (shuffled)"} <= set(texts), texts
    ax = data_axes(figs["similarity_trained_control_cka.png"])[0]
    assert f"control [{CONTROL_LABEL}]" in ax.get_title() and f"control [{CONTROL_LABEL}]" in ax.get_xlabel()


def test_one_layer_store_beside_multi_layer_ones(tmp_path, monkeypatch):
    """A log-Mel-like one-layer store in a sweep with a 5-layer control: a labelled point at its
    layer and a dotted line across, never a second layer axis."""
    ctl = write_store(tmp_path / "whisper.h5", list(range(5)), CONTROL, cue={}, seed=11)
    mel = write_store(tmp_path / "logmel.h5", [0], cue={0: 1.5}, seed=12)
    figures = catch_figures(monkeypatch)
    res = run_sweep([ctl, mel], probes=("logreg",), poolings=("mean",), class_weights=("none",), cv=3, n_jobs=1,
                    out_dir=tmp_path / "s", n_boot=20, nested="off", progress=False, quiet=True)
    write_report(res.out_dir)
    (ax,) = data_axes(figures["stores.png"])
    assert_layer_axis(ax, list(range(5)))
    assert line_xs(ax) == [[0.0, 1.0, 2.0, 3.0, 4.0]]  # the control's curve only
    point = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(point) == 1 and list(point[0].lines[0].get_xdata()) == [0.0]
    mel_bacc = res.summary.query("store == 'logmel' and probe == 'logreg'")["balanced_accuracy_mean"].iloc[0]
    across = [l for l in ax.get_lines() if l.get_transform() is not ax.transData and l.get_linestyle() == ":"]
    assert len(across) == 1 and across[0].get_ydata()[0] == pytest.approx(mel_bacc)
    assert f"{mel_bacc:.2f}" in [t.get_text() for t in ax.texts]
    texts = legend_texts(figures["stores.png"])
    assert "logmel (one layer: 0)" in texts and "whisper [random-init control] (best per layer)" in texts
    # the one-layer store's own per-layer figure is a point, not a dot on a layer axis
    (own,) = data_axes(figures["layers_logmel.png"])
    assert own.get_xlim()[1] - own.get_xlim()[0] >= 0.9 and labelled_ticks(own) == ["logreg/mean"]

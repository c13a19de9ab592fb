"""A sweep on a local Dask cluster (loopback) gives the same table as the local backend."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from featstore_cli.probes_app import app
from featstore.fakestore import write_fake_store
from probes.sweep import run_sweep

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c


def test_dask_cluster_sweep_equals_local(tmp_path, cluster):
    store = write_fake_store(tmp_path / "s.h5", n_speakers=20, items_per_speaker=4, num_layers=3, dim=8, seed=1)
    kw = dict(layers=[0, 1, 2], poolings=("mean", "center"), probes=("logreg",), class_weights=("none",), cv=3,
              progress=False, quiet=True, n_boot=50)
    local = run_sweep([store], out_dir=tmp_path / "local", n_jobs=1, **kw)
    r = CliRunner().invoke(app, ["sweep", str(store), "--layers", "0-2", "--pooling", "mean,center", "--probe", "logreg",
                                 "--class-weight", "none", "--cv", "3", "--n-boot", "50", "--no-report", "--no-progress",
                                 "--scheduler", cluster.scheduler_address, "--out", str(tmp_path / "dask")])
    assert r.exit_code == 0, r.output
    a = local.folds[local.folds["probe"] == "logreg"].sort_values(["layer", "pooling", "fold"]).reset_index(drop=True)
    b = pd.read_csv(tmp_path / "dask" / "folds.csv")
    b = b[b["probe"] == "logreg"].sort_values(["layer", "pooling", "fold"]).reset_index(drop=True)
    assert len(a) == len(b) == 3 * 2 * 3
    for col in ("balanced_accuracy", "accuracy", "macro_f1"):
        assert (a[col].to_numpy() == b[col].to_numpy()).all(), col
    assert a["balanced_accuracy"].max() > 0.6  # the informative layer is found on the cluster too

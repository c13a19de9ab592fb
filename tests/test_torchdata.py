"""featstore.torchdata: a DataLoader over a store yields exactly the store's frames."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featstore.extract import extract
from featstore.fakestore import write_fake_store
from featstore.torchdata import FrameDataset, collate_frames
from tests.conftest import write_manifest, write_wav

ROOT = Path(__file__).resolve().parents[1]


def h5_item(path, row, layer, scope="clip"):
    """Item ``row``'s frames with nothing but h5py and numpy (the documented layout)."""
    with h5py.File(path, "r") as f:
        off, n = int(f["items/offset"][row]), int(f["items/num_frames"][row])
        a, b = (0, n) if scope == "clip" else (int(f["items/segment_start_frame"][row]), int(f["items/segment_end_frame"][row]))
        return f[f"layers/{layer:02d}"][off + a : off + b]


@pytest.fixture()
def seg_store(tmp_path):
    return write_fake_store(tmp_path / "fake.h5", n_speakers=6, items_per_speaker=5, num_layers=3, dim=8,
                            frames_range=(3, 11), with_segments=True, seed=3)


class PidDataset(FrameDataset):
    """Also reports which process read the item and whether its handle was opened there."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["pid"] = os.getpid()
        item["own_handle"] = self._pid == os.getpid() and self._h5.id.valid
        return item


@pytest.mark.parametrize("scope", ["clip", "segment"])
def test_dataloader_two_workers_yields_the_stores_frames(seg_store, scope):
    ds = PidDataset(seg_store, layers=1, scope=scope)
    assert len(ds) == 30 and ds.labels == sorted(set(ds.labels)) and ds.skipped == []
    ds[0]  # the parent opens a handle first: workers must not use it
    assert ds._pid == os.getpid()
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_frames,
                        generator=torch.Generator().manual_seed(0))
    seen, pids = set(), set()
    with h5py.File(seg_store) as f:
        labels = f["items/label"].asstr()[:]
        seg_s, seg_e = f["items/segment_start_frame"][:], f["items/segment_end_frame"][:]
    for batch in loader:
        assert batch["frames"].shape[0] == batch["lengths"].shape[0] == batch["mask"].shape[0]
        assert batch["frames"].shape[1] == int(batch["lengths"].max()) == batch["mask"].shape[1]
        assert all(batch["own_handle"])
        pids.update(batch["pid"])
        for j, row in enumerate(batch["rows"].tolist()):
            ref = h5_item(seg_store, row, 1, scope)
            n = int(batch["lengths"][j])
            assert n == len(ref) > 0
            if scope == "segment":
                assert n == seg_e[row] - seg_s[row]
            np.testing.assert_array_equal(batch["frames"][j, :n].numpy(), ref)  # exactly, not approximately
            assert batch["mask"][j].tolist() == [True] * n + [False] * (batch["frames"].shape[1] - n)
            assert torch.count_nonzero(batch["frames"][j, n:]) == 0
            assert ds.labels[int(batch["labels"][j])] == labels[row]
            seen.add(row)
    assert seen == set(range(30))  # every item once
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, each with its own handle


def test_stacked_layers_float16_and_pickling(tmp_path, seg_store):
    ds = FrameDataset(seg_store, layers="all", scope="segment")
    assert ds.layer_ids == [0, 1, 2] and ds.stacked
    batch = collate_frames([ds[i] for i in range(5)])
    assert batch["frames"].shape == (5, 3, int(batch["lengths"].max()), 8)
    for j in range(5):
        n = int(batch["lengths"][j])
        for pos, k in enumerate([0, 1, 2]):
            np.testing.assert_array_equal(batch["frames"][j, pos, :n].numpy(), h5_item(seg_store, j, k, "segment"))
    last = FrameDataset(seg_store, layers=-1)
    assert last.layer_ids == [2] and not last.stacked and last[0]["frames"].shape[-1] == 8
    two = FrameDataset(seg_store, layers=[2, 0])
    assert two[0]["frames"].shape[0] == 2
    np.testing.assert_array_equal(two[0]["frames"][0].numpy(), h5_item(seg_store, 0, 2))
    # a spawned worker gets the dataset pickled: no handle travels with it
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._h5 is None
    np.testing.assert_array_equal(clone[3]["frames"].numpy(), ds[3]["frames"].numpy())
    with pytest.raises(ValueError, match=r"layer 7 is not in the store \(stored layers: \[0, 1, 2\]\)"):
        FrameDataset(seg_store, layers=7)


def test_failed_unlabelled_and_unknown_labels_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        write_wav(tmp_path / f"w{i}.wav", (0.1 * rng.normal(size=4000 + 800 * i)).astype(np.float32))
        rows.append({"path": f"w{i}.wav", "label": ["a", "b", "", "a", "c", "b"][i], "speaker": f"s{i % 3}",
                     "start": 0.05, "end": 0.15})
    rows.append({"path": "gone.wav", "label": "a", "speaker": "s0", "start": 0.05, "end": 0.15})
    res = extract(write_manifest(tmp_path / "m.csv", rows), "logmel", tmp_path / "s.h5", progress=False)
    assert res.ok == 6
    ds = FrameDataset(res.path, layers=0, scope="segment")
    assert ds.ids == ["w0", "w1", "w3", "w4", "w5"] and ds.labels == ["a", "b", "c"]
    assert ds.skipped == [("w2", "unlabelled"), ("gone", "status missing")]
    assert ds.targets.tolist() == [0, 1, 0, 2, 1]
    fixed = FrameDataset(res.path, layers=0, labels=["b", "a"], keep_unlabelled=True)
    assert fixed.ids == ["w0", "w1", "w2", "w3", "w5"] and fixed.targets.tolist() == [1, 0, -1, 1, 0]
    assert ("w4", "label 'c' not in labels") in fixed.skipped
    clip, seg = fixed[0], ds[0]
    assert clip["length"] == h5_item(res.path, 0, 0).shape[0] > seg["length"] == h5_item(res.path, 0, 0, "segment").shape[0]
    subset = FrameDataset(res.path, layers=0, rows=[3, 1])
    assert subset.ids == ["w1", "w3"] and subset.labels == ["a", "b"] and subset.skipped == []
    mask = np.zeros(7, dtype=bool)
    mask[[1, 3]] = True
    assert FrameDataset(res.path, layers=0, rows=mask).ids == ["w1", "w3"]


def readme_example() -> str:
    """The torchdata example of the README (or, before it is merged there, of the notes)."""
    for doc in (ROOT / "README.md", ROOT / "notes" / "ecosystem-readme.md"):
        text = doc.read_text() if doc.exists() else ""
        m = re.search(r"<!-- torchdata-example -->\s*```python\n(.*?)```", text, re.S)
        if m:
            return m.group(1)
    raise AssertionError("no ```python block after <!-- torchdata-example --> in README.md or notes/ecosystem-readme.md")


def test_readme_example_trains_a_head(tmp_path):
    store = write_fake_store(tmp_path / "fake.h5", n_speakers=12, items_per_speaker=10, num_layers=4, dim=16,
                             informative_layers=(2,), cue_strength=3.0, speaker_strength=0.3, seed=1)
    code = readme_example()
    assert 'store_path = "cache/wavlm-base-plus__clips.h5"' in code
    code = code.replace('"cache/wavlm-base-plus__clips.h5"', repr(str(store))).replace("layers=6", "layers=2")
    env: dict = {}
    exec(compile(code, "README example", "exec"), env)  # noqa: S102 - the documented example, run as written
    ds, head = env["ds"], env["head"]
    assert len(ds) == 120 and env["losses"][-1] < env["losses"][0]
    # the head learned the cue: training accuracy well above chance (1/3)
    batch = collate_frames([ds[i] for i in range(len(ds))])
    m = batch["mask"].unsqueeze(-1)
    with torch.no_grad():
        pred = head((batch["frames"] * m).sum(1) / batch["lengths"].unsqueeze(-1)).argmax(1)
    assert (pred == batch["labels"]).float().mean() > 0.8

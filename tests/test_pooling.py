"""Pooling over true frames / segments, spans, the pooled cache, and the no-padding guarantee."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import featstore
from featstore.fakestore import write_fake_store
from featstore.store import StoreWriter
from probes.cache import CacheWarning, sidecar_dir
from probes.pooling import (
    POOLINGS,
    all_layers_matrix,
    cache_key,
    frame_sequences,
    item_spans,
    pool_frames,
    pooled_matrix,
    resolve_scope,
    scope_summary,
)

FRAMES = np.array([[1, 10], [2, 20], [4, 40], [8, 80]], dtype=np.float32)


def write_store(path, items, segments=None, num_layers=2):
    """Hand-made store: item j's layer k frames are ``items[j] * (k + 1)``; ``None`` = failed item."""
    segments = segments or [(-1, -1)] * len(items)
    dim = next(x.shape[1] for x in items if x is not None)
    rows = [{"id": f"i{j}", "label": "a", "group": f"s{j}", "segment_start_frame": s, "segment_end_frame": e}
            for j, (s, e) in enumerate(segments)]
    attrs = {"encoder": "hand", "sample_rate": 16000}
    writer = StoreWriter.create(path, rows, attrs, [dim] * num_layers)
    writer.write_items([
        (j, {} if x is not None else {"status": "too_short"},
         None if x is None else [x * (k + 1) for k in range(num_layers)])
        for j, x in enumerate(items)
    ])
    return writer.finalize()


def reference(x: np.ndarray, method: str, k: int = 1) -> np.ndarray:
    x = x.astype(np.float64)
    t = len(x)
    if method == "mean":
        return x.mean(0)
    if method == "stats":
        return np.r_[x.mean(0), x.std(0)]
    if method == "max":
        return x.max(0)
    if method == "first":
        return x[0]
    if method == "last":
        return x[-1]
    kk = min(k, t)
    return x[(t - kk) // 2 : (t - kk) // 2 + kk].mean(0)


@pytest.fixture(scope="module")
def seg_store(tmp_path_factory):
    return write_fake_store(tmp_path_factory.mktemp("pool") / "seg.h5", n_speakers=6, items_per_speaker=4,
                            num_layers=3, dim=5, with_segments=True, seed=3)


# -- pool_frames ------------------------------------------------------------------------------
def test_pool_frames_exact_values():
    std = np.float32(np.sqrt(7.1875))  # population std of 1, 2, 4, 8
    expected = {
        "mean": [3.75, 37.5], "stats": [3.75, 37.5, std, np.float32(10 * np.sqrt(7.1875))],
        "max": [8, 80], "center": [2, 20], "first": [1, 10], "last": [8, 80],
    }
    assert set(expected) == set(POOLINGS)
    for method, want in expected.items():
        got = pool_frames(FRAMES, method)
        assert got.dtype == np.float32 and got.ndim == 1
        np.testing.assert_allclose(got, np.array(want, dtype=np.float32), rtol=1e-7)
    np.testing.assert_array_equal(pool_frames(FRAMES, "center", center_k=2), [3, 30])  # frames 1, 2
    np.testing.assert_allclose(pool_frames(FRAMES, "center", center_k=3), [7 / 3, 70 / 3], rtol=1e-6)  # 0..2
    np.testing.assert_array_equal(pool_frames(FRAMES, "center", center_k=9), [3.75, 37.5])  # all frames
    np.testing.assert_array_equal(pool_frames(FRAMES[:3], "center"), [2, 20])  # odd: the middle one
    np.testing.assert_array_equal(pool_frames(FRAMES[:1], "stats"), [1, 10, 0, 0])


def test_pool_frames_errors():
    with pytest.raises(ValueError, match="cannot pool an item with 0 frames"):
        pool_frames(np.zeros((0, 3), np.float32), "mean")
    with pytest.raises(ValueError, match=r"unknown pooling 'median'; use one of mean, stats, max"):
        pool_frames(FRAMES, "median")
    with pytest.raises(ValueError, match=r"2-D \(num_frames, dim\)"):
        pool_frames(FRAMES[0], "mean")
    with pytest.raises(ValueError, match="center_k must be a positive integer"):
        pool_frames(FRAMES, "center", center_k=0)


# -- spans ------------------------------------------------------------------------------------
def test_item_spans_clip_segment_auto(seg_store, tmp_path):
    with featstore.open(seg_store) as st:
        off, n = st.column("offset"), st.column("num_frames")
        s, e = st.column("segment_start_frame"), st.column("segment_end_frame")
        assert (s >= 0).all() and (e > s).all()
        start, stop = item_spans(st, "clip")
        np.testing.assert_array_equal(start, off)
        np.testing.assert_array_equal(stop, off + n)
        start, stop = item_spans(st, "segment")
        np.testing.assert_array_equal(start, off + s)
        np.testing.assert_array_equal(stop, off + e)
        assert resolve_scope(st, "auto") == "segment"
        np.testing.assert_array_equal(item_spans(st, "auto")[0], off + s)
        with pytest.raises(ValueError, match=r"unknown scope 'word'; use one of auto, clip, segment"):
            item_spans(st, "word")
    plain = write_fake_store(tmp_path / "plain.h5", n_speakers=4, items_per_speaker=2, num_layers=2, dim=3,
                             informative_layers=(1,))
    with featstore.open(plain) as st:
        assert resolve_scope(st, "auto") == "clip"
        with pytest.raises(ValueError, match=r"scope 'segment': 8 of 8 items with frames have no segment "
                                             r"\(spk000_000, spk000_001, spk001_000 and 5 more\); "
                                             r"pool them with scope 'clip'"):
            item_spans(st, "segment")


def test_empty_segment_falls_back_to_centre_frame(tmp_path):
    x = np.arange(10, dtype=np.float32).reshape(5, 2)  # frames [0,1], [2,3], ... [8,9]
    path = write_store(tmp_path / "s.h5", [x, x + 100], segments=[(2, 2), (0, 2)])
    with featstore.open(path) as st:
        with pytest.warns(UserWarning, match=r"1 items have an empty segment \(i0\); they are pooled over "
                                             r"their clip's centre frame"):
            start, stop, fallback = item_spans(st, "segment", return_fallback=True)
        np.testing.assert_array_equal(stop - start, [1, 2])
        np.testing.assert_array_equal(fallback, [True, False])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = pooled_matrix(st, 0, "mean", "segment", cache=False)
        np.testing.assert_array_equal(m, [[4, 5], [101, 102]])
        assert scope_summary(st) == {"scope": "segment", "items": 2, "items_with_frames": 2,
                                     "empty_segment_fallbacks": 1}


# -- pooled_matrix ------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["clip", "segment"])
def test_pooled_matrix_matches_per_item_pooling(seg_store, scope):
    with featstore.open(seg_store) as st:
        start, stop = item_spans(st, scope)
        data = st.layer(1)
        for method in POOLINGS:
            for k in (1, 2):
                got = pooled_matrix(st, 1, method, scope, cache=False, center_k=k)
                want = np.stack([reference(data[a:b], method, k) for a, b in zip(start, stop)])
                assert got.dtype == np.float32
                assert got.shape == (st.num_items, 10 if method == "stats" else 5)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        rows = np.array([5, 0, 3])
        np.testing.assert_array_equal(pooled_matrix(st, 1, "max", scope, rows=rows, cache=False),
                                      pooled_matrix(st, 1, "max", scope, cache=False)[rows])


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _entries(path) -> list[Path]:
    return sorted(sidecar_dir(path).glob("*/*.npy"))


def test_pooled_cache_lives_beside_the_store_and_is_read(seg_store, tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(seg_store.read_bytes())
    before = (_digest(path), path.stat().st_mtime_ns)
    with featstore.open(path) as st:
        first = pooled_matrix(st, 2, "stats", "auto")
        second = pooled_matrix(st, 2, "stats", "auto")
        np.testing.assert_array_equal(first, second)
        pooled_matrix(st, 2, "mean", cache=False)  # cache=False writes nothing
    assert (_digest(path), path.stat().st_mtime_ns) == before  # the store itself is never written
    with h5py.File(path, "r") as h5:
        assert "pooled" not in h5
    entries = _entries(path)
    assert [e.name.split("-L")[0] for e in entries] == ["segment-stats"]  # "auto" resolved in the key
    np.testing.assert_array_equal(np.load(entries[0]), first)
    # the cache is what is read: a planted value comes back
    planted = np.full((24, 10), 7.0, np.float32)
    np.save(entries[0], planted)
    with featstore.open(path) as st:
        np.testing.assert_array_equal(pooled_matrix(st, 2, "stats", rows=[1, 2]), planted[:2])
        assert cache_key("clip", "center", 3) == "clip-center3"


def test_cache_written_while_another_handle_reads_the_store(seg_store, tmp_path):
    path = tmp_path / "busy.h5"
    path.write_bytes(seg_store.read_bytes())
    other = featstore.open(path)
    try:
        with featstore.open(path) as st:
            got = pooled_matrix(st, 0, "mean", "clip")
            assert st.num_items == 24
        assert other.num_items == 24 and len(_entries(path)) == 1
    finally:
        other.close()
    with featstore.open(path) as st:
        np.testing.assert_array_equal(pooled_matrix(st, 0, "mean", "clip", cache=False), got)


def _read_only(path):
    os.chmod(path, 0o444)
    os.chmod(path.parent, 0o555)


def _writable(path):
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_store_and_folder_fall_back_to_the_user_cache(seg_store, tmp_path, monkeypatch):
    store_dir = tmp_path / "ro"
    store_dir.mkdir()
    path = store_dir / "ro.h5"
    path.write_bytes(seg_store.read_bytes())
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "user"))
    _read_only(path)
    try:
        with featstore.open(path) as st:
            got = pooled_matrix(st, 1, "max", "clip")
            np.testing.assert_array_equal(got, pooled_matrix(st, 1, "max", "clip", cache=False))
        assert not sidecar_dir(path).exists()
        assert len(list((tmp_path / "user" / "pooled").glob("*/*.npy"))) == 1
    finally:
        _writable(path)


def test_unwritable_locations_fall_back_then_warn(seg_store, tmp_path, monkeypatch):
    """Injected failures (works as root too): the sidecar folder cannot be made -> the user cache
    folder is used; neither can -> no cache, one CacheWarning, the same numbers."""
    path = tmp_path / "s.h5"
    path.write_bytes(seg_store.read_bytes())
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "user"))
    real_mkdir = Path.mkdir
    blocked = [sidecar_dir(path)]

    def mkdir(self, *args, **kwargs):
        if any(self == b or b in self.parents for b in blocked):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with featstore.open(path) as st:
        want = pooled_matrix(st, 1, "mean", "clip", cache=False)
        np.testing.assert_array_equal(pooled_matrix(st, 1, "mean", "clip"), want)
    assert not sidecar_dir(path).exists() and len(list((tmp_path / "user").glob("pooled/*/*.npy"))) == 1
    blocked.append(tmp_path / "user")
    with featstore.open(path) as st:
        with pytest.warns(CacheWarning, match="are not cached .*Permission denied"):
            got = pooled_matrix(st, 1, "max", "clip")
        np.testing.assert_array_equal(got, pooled_matrix(st, 1, "max", "clip", cache=False))


def test_legacy_pooled_group_stays_readable_and_is_not_trusted(seg_store, tmp_path):
    path = tmp_path / "legacy.h5"
    path.write_bytes(seg_store.read_bytes())
    with h5py.File(path, "a") as h5:  # what older versions wrote into finished stores
        h5.create_dataset("pooled/clip-mean/01", data=np.full((24, 5), 9.0, np.float32))
    with featstore.open(path) as st:
        assert st.pooled("clip-mean", 1)[0, 0] == 9.0  # still readable ...
        got = pooled_matrix(st, 1, "mean", "clip")  # ... but not used: it carries no version
        start, stop = item_spans(st, "clip")
        np.testing.assert_allclose(got[3], st.layer(1)[start[3]:stop[3]].mean(0), rtol=1e-6)


def test_pooled_entries_are_versioned(seg_store, tmp_path, monkeypatch):
    import probes.cache as pc

    path = tmp_path / "v.h5"
    path.write_bytes(seg_store.read_bytes())
    with featstore.open(path) as st:
        pooled_matrix(st, 0, "mean", "clip")
    (entry,) = _entries(path)
    np.save(entry, np.full((24, 5), 3.0, np.float32))  # a stale value under the current versions
    with featstore.open(path) as st:
        assert pooled_matrix(st, 0, "mean", "clip")[0, 0] == 3.0
    real = pc.library_versions()
    for key in ("featstore", "numpy", "scipy"):
        monkeypatch.setattr(pc, "library_versions", lambda key=key: {**real, key: real[key] + ".post1"})
        with featstore.open(path) as st:
            fresh = pooled_matrix(st, 0, "mean", "clip")  # another version: recomputed, not the stale entry
            np.testing.assert_array_equal(fresh, pooled_matrix(st, 0, "mean", "clip", cache=False))
    assert len(_entries(path)) == 4


@pytest.mark.parametrize("scope", ["clip", "segment"])
def test_pooling_never_touches_frames_outside_spans(seg_store, tmp_path, scope):
    path = tmp_path / "corrupt.h5"
    path.write_bytes(seg_store.read_bytes())
    keep = np.array([3, 10, 17])
    with featstore.open(path) as st:
        before = {m: pooled_matrix(st, 1, m, scope, rows=keep, cache=False, center_k=2) for m in POOLINGS}
        seqs = frame_sequences(st, 1, scope, rows=keep)
        start, stop = item_spans(st, scope)
        total = st.h5["layers/00"].shape[0]
    inside = np.zeros(total, dtype=bool)
    for i in keep:
        inside[start[i] : stop[i]] = True
    with h5py.File(path, "r+") as h5:
        for name in h5["layers"]:
            data = h5["layers"][name][:]
            data[~inside] = 1e6
            h5["layers"][name][:] = data
    with featstore.open(path) as st:
        assert st.layer(1).max() == 1e6
        for m in POOLINGS:
            after = pooled_matrix(st, 1, m, scope, cache=False, center_k=2)  # all items, then the kept ones
            np.testing.assert_allclose(after[keep], before[m], rtol=1e-6, atol=1e-6, err_msg=m)
            assert after[keep].max() < 1e3
        for a, b in zip(frame_sequences(st, 1, scope, rows=keep), seqs):
            np.testing.assert_array_equal(a, b)


def test_items_without_frames(tmp_path):
    x = np.ones((3, 2), np.float32)
    path = write_store(tmp_path / "f.h5", [x, None, 2 * x])
    with featstore.open(path) as st:
        np.testing.assert_array_equal(pooled_matrix(st, 1, "mean", rows=[0, 2]), [[2, 2], [4, 4]])
        (entry,) = _entries(path)
        assert np.isnan(np.load(entry)[1]).all()  # cached with a NaN row for the failed item
        with pytest.raises(ValueError, match=r"1 of the requested items have no frames \(i1\); select items "
                                             r"with frames \(e.g. status == 'ok'\)"):
            pooled_matrix(st, 1, "mean")
        with pytest.raises(ValueError, match=r"layer 2 does not exist: the store has layers 0..1"):
            pooled_matrix(st, 2, "mean", rows=[0])
        with pytest.raises(ValueError, match=r"row indices must lie in \[0, 3\)"):
            pooled_matrix(st, 0, "mean", rows=[0, 5])


def test_all_layers_and_frame_sequences(seg_store):
    with featstore.open(seg_store) as st:
        rows = np.array([2, 7, 11])
        stack = all_layers_matrix(st, "center", "clip", rows=rows, cache=False)
        assert stack.shape == (3, 3, 5) and stack.dtype == np.float32
        for k in range(3):
            np.testing.assert_array_equal(stack[:, k], pooled_matrix(st, k, "center", "clip", rows, cache=False))
        seqs = frame_sequences(st, 2, "segment", rows=rows)
        start, stop = item_spans(st, "segment")
        for i, x in zip(rows, seqs):
            np.testing.assert_array_equal(x, st.layer(2)[start[i] : stop[i]])
        clip = frame_sequences(st, 0, "clip", rows=rows)
        short = frame_sequences(st, 0, "clip", rows=rows, max_frames=3)
        for full, cut in zip(clip, short):
            lo = (len(full) - 3) // 2
            np.testing.assert_array_equal(cut, full[lo : lo + 3])


def test_all_layers_requires_equal_widths(tmp_path):
    rows = [{"id": "a", "label": "x", "group": "g"}]
    w = StoreWriter.create(tmp_path / "w.h5", rows, {"encoder": "mel"}, [2, 3])
    w.write_items([(0, {}, [np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32)])])
    with featstore.open(w.finalize()) as st:
        with pytest.raises(ValueError, match=r"layers \[0, 1\] have different widths \[2, 3\]"):
            all_layers_matrix(st, "mean", "clip")


# -- bounded memory: every reader streams offset-sorted chunks -------------------------------------
class _SpyDataset:
    def __init__(self, ds, reads):
        self._ds, self._reads = ds, reads

    def __getitem__(self, sel):
        out = self._ds[sel]
        self._reads.append((out.shape[0], out.dtype))
        return out

    def read_direct(self, dest, source_sel, dest_sel):
        self._ds.read_direct(dest, source_sel, dest_sel)
        sel = source_sel if isinstance(source_sel, slice) else source_sel[0]
        self._reads.append((len(range(*sel.indices(self._ds.shape[0]))), dest.dtype))

    def __getattr__(self, name):
        return getattr(self._ds, name)


class _SpyLayers:
    def __init__(self, group, reads):
        self._group, self._reads = group, reads

    def __getitem__(self, name):
        return _SpyDataset(self._group[name], self._reads)

    def __getattr__(self, name):
        return getattr(self._group, name)

    def __iter__(self):
        return iter(self._group)

    def __len__(self):
        return len(self._group)

    def __contains__(self, name):
        return name in self._group


class _SpyFile:
    """An h5py file whose layer datasets record the rows of every read."""

    def __init__(self, h5):
        self._h5, self.reads = h5, []

    def __getitem__(self, key):
        if key == "layers":
            return _SpyLayers(self._h5["layers"], self.reads)
        if isinstance(key, str) and key.startswith("layers/"):
            return _SpyDataset(self._h5[key], self.reads)
        return self._h5[key]

    def __contains__(self, key):
        return key in self._h5

    def __getattr__(self, name):
        return getattr(self._h5, name)


@pytest.fixture()
def half_store(tmp_path):
    """A float16 store of 40 items x 5-40 frames x 6 dims (one item of 300 frames)."""
    rng = np.random.default_rng(7)
    rows, frames = [], []
    for j in range(40):
        t = 300 if j == 17 else int(rng.integers(5, 41))
        rows.append({"id": f"i{j}", "label": "ab"[j % 2], "group": f"s{j % 8}",
                     "segment_start_frame": 1, "segment_end_frame": t - 1})
        frames.append([rng.normal(size=(t, 6)).astype(np.float16) * 3])
    w = StoreWriter.create(tmp_path / "half.h5", rows, {"encoder": "hand"}, [6], dtype="float16")
    w.write_items([(j, {}, f) for j, f in enumerate(frames)])
    return w.finalize()


def test_pooling_streams_chunks_of_the_stored_dtype(half_store, monkeypatch):
    """Peak memory follows the chunk: no read of more than one chunk of frames, frames read as
    float16 (no float32 copy of the layer), and the same numbers as per-item float64 pooling."""
    import featstore.store as fs

    monkeypatch.setattr(fs, "CHUNK_BYTES", 8 * 6 * 32)  # 32 frames of 6 dims per chunk
    with featstore.open(half_store) as st:
        total = st.h5["layers/00"].shape[0]
        ref_layer = st.layer(0)
        spy = _SpyFile(st.h5)
        st.h5 = spy
        assert st.chunk_frames(0) == 32 and total > 600
        for scope in ("clip", "segment"):
            start, stop = item_spans(st, scope)
            for method in POOLINGS:
                spy.reads.clear()
                got = pooled_matrix(st, 0, method, scope, cache=False, center_k=3)
                want = np.stack([reference(ref_layer[a:b], method, 3) for a, b in zip(start, stop)])
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{scope} {method}")
                assert spy.reads and max(n for n, _ in spy.reads) <= 32, (method, max(spy.reads))
                assert {d for _, d in spy.reads} == {np.dtype(np.float16)}
            spy.reads.clear()
            seqs = frame_sequences(st, 0, scope, rows=[17, 3, 17])
            for i, x in zip([17, 3, 17], seqs):
                np.testing.assert_array_equal(x, ref_layer[start[i]:stop[i]].astype(np.float32))
            assert max(n for n, _ in spy.reads) <= 32
        spy.reads.clear()
        idx = np.array([5, 700, 3, 3, total - 1, 250])
        np.testing.assert_array_equal(st.read_frames(0, idx), ref_layer[idx])
        assert max(n for n, _ in spy.reads) <= 32
        spy.reads.clear()
        offs, nfr = st.column("offset"), st.column("num_frames")
        order = [5, 17, 2, 39, 0]
        seen = [(r, f) for r, f in st.iter_item_frames(0, order)]
        assert [r for r, _ in seen] == order  # the caller's order
        for r, f in seen:
            np.testing.assert_array_equal(f, ref_layer[offs[r]:offs[r] + nfr[r]])
        assert max(n for n, _ in spy.reads) <= 300  # an item longer than a chunk is read alone
        st.h5 = spy._h5


def test_long_span_pieces_merge_exactly(half_store):
    """A span longer than a chunk is pooled from pieces: same mean/std/max as in one piece."""
    with featstore.open(half_store) as st:
        for method in ("mean", "stats", "max"):
            whole = pooled_matrix(st, 0, method, "clip", rows=[17], cache=False, chunk_frames=1000)
            pieces = pooled_matrix(st, 0, method, "clip", rows=[17], cache=False, chunk_frames=7)
            np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6, err_msg=method)

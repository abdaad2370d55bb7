"""compute_kernel: agreement with the direct kernel, lazy reads, executors (thread pool, 2-worker
Dask LocalCluster) giving bitwise-identical stores, and clear errors."""
import concurrent.futures as cf

import numpy as np
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.scale import KernelStore, open_store
from tests.scale._kernels import data, two_kernels

ARCH = nl.serial(nl.Dense(64, W_std=1.4, b_std=0.1), nl.Relu(), nl.Dense(64, W_std=1.4),
                 nl.Erf(), nl.Dense(1))


def test_matches_direct_kernel_and_lazy_reads(tmp_path):
    x = data(37, 4, seed=1)
    h = ntkit.compute_kernel(ARCH, x, store=str(tmp_path / "k.zarr"), tile=8, progress=False)
    assert isinstance(h, KernelStore) and h.status().complete and h.status().total == 15
    ref = ARCH.kernel(x)
    for key in ("nngp", "ntk"):
        k = h.load(key)
        torch.testing.assert_close(k, getattr(ref, key), rtol=1e-13, atol=1e-13)
        assert torch.equal(k, k.T)                         # mirrored exactly
    m = h["ntk"]
    full = h.load("ntk")
    assert m.shape == (37, 37)
    assert torch.equal(m[3:30:3, 20:37], full[3:30:3, 20:37])          # crosses the diagonal
    assert torch.equal(m[5, 2:9], full[5, 2:9]) and torch.equal(m[-1, :], full[-1])
    assert torch.equal(m.diagonal(), torch.diagonal(full))
    v = torch.randn(37, 3, dtype=torch.float64)
    torch.testing.assert_close(m.matmul(v), full @ v, rtol=1e-12, atol=1e-12)
    # reopen read-only from disk
    assert torch.equal(open_store(str(tmp_path / "k.zarr")).load("ntk"), full)


def test_rectangular_dict_function_and_memory_store():
    x1, x2 = data(11, 3, seed=2), data(17, 3, seed=3)
    h = ntkit.compute_kernel(two_kernels, x1, x2, get=("lin", "cube"), store=None, tile=5,
                             progress=False)
    assert h.status().total == 3 * 4 and not h.symmetric
    g = torch.from_numpy(x1) @ torch.from_numpy(x2).T
    torch.testing.assert_close(h.load("lin"), g, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h.load("cube"), g ** 3, rtol=1e-12, atol=1e-12)
    v = torch.randn(17, dtype=torch.float64)
    torch.testing.assert_close(h["lin"].matmul(v), g @ v, rtol=1e-12, atol=1e-12)


def test_conv_kernel_with_spatial_axes():
    arch = nl.serial(nl.Conv(4, (2, 2), padding="SAME"), nl.Relu())
    x = np.random.default_rng(0).normal(size=(7, 2, 3, 3))
    h = ntkit.compute_kernel(arch, x, get="nngp", store=None, tile=3, progress=False)
    k = h.load("nngp")
    ref = arch.kernel(x, get="nngp")
    assert k.shape == ref.shape
    torch.testing.assert_close(k, ref, rtol=1e-13, atol=1e-13)


def _stores_equal(a, b, keys):
    for key in keys:
        assert torch.equal(a.load(key), b.load(key)), key


def test_thread_pool_and_dask_cluster_bitwise_identical(tmp_path):
    distributed = pytest.importorskip("distributed")
    # big enough that MKL would split the tiles' GEMMs across threads if a tile ever ran on
    # more than one (which changes the bits)
    x = data(256, 3072, seed=4)
    kw = dict(store=None, tile=128, progress=False)
    inproc = ntkit.compute_kernel(ARCH, x, **kw)
    with cf.ThreadPoolExecutor(3) as ex:
        _stores_equal(inproc, ntkit.compute_kernel(ARCH, x, executor=ex, **kw), ARCH_KEYS)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        p = str(tmp_path / "dask.zarr")
        h = ntkit.compute_kernel(ARCH, x, executor=client, **dict(kw, store=p))
        assert len(client.nthreads()) == 2
    _stores_equal(inproc, h, ARCH_KEYS)
    torch.testing.assert_close(h.load("ntk"), ARCH.kernel(x, get="ntk"), rtol=1e-13, atol=1e-13)


ARCH_KEYS = ("nngp", "ntk")


def test_concurrent_tiles_are_single_threaded_and_identical():
    """Tiles running concurrently in pool threads each run torch on one thread (the OpenMP
    setting is per thread), so all give the bits of the single-threaded tile."""
    from ntkit.scale._compute import compute_tile
    g = np.random.default_rng(0)
    xa, xb = g.normal(size=(256, 3072)), g.normal(size=(256, 3072))
    before = torch.get_num_threads()
    ref = compute_tile(ARCH, ("ntk",), xa, xb, False, "float64", True)["ntk"]
    with cf.ThreadPoolExecutor(3) as ex:
        outs = [f.result()["ntk"] for f in [ex.submit(compute_tile, ARCH, ("ntk",), xa, xb, False,
                                                      "float64", True) for _ in range(6)]]
    assert all(np.array_equal(o, ref) for o in outs)
    assert torch.get_num_threads() == before                # restored


def test_incomplete_store_reads_nan_and_refuses_load(tmp_path):
    x = data(10, 2)
    p = str(tmp_path / "k.zarr")
    h = ntkit.compute_kernel(ARCH, x, get="ntk", store=p, tile=4, progress=False)
    h._done_arr[0, 2] = 0                                   # forget one tile
    h = open_store(p)
    st = h.status()
    assert (st.done, st.total, st.complete) == (5, 6, False) and "incomplete" in str(st)
    assert torch.isnan(h["ntk"][0:4, 8:10]).all() and torch.isnan(h["ntk"][8:10, 0:4]).all()
    assert not torch.isnan(h["ntk"][0:8, 0:8]).any()
    with pytest.raises(RuntimeError, match="rerun the same"):
        h.load("ntk")
    h2 = ntkit.compute_kernel(ARCH, x, get="ntk", store=p, progress=False)   # resumes
    assert h2.status().complete


def test_clear_errors(tmp_path):
    x = data(6, 2)
    bad = [
        (dict(arch_or_fn=3), TypeError, "arch_or_fn"),
        (dict(get="bogus"), ValueError, "get"),
        (dict(tile=0), ValueError, "tile"),
        (dict(x2=data(4, 3)), ValueError, "x2"),
        (dict(executor=object()), TypeError, "executor"),
        (dict(memory_budget=-1), ValueError, "memory_budget"),
        (dict(x1=np.full((3, 2), np.nan)), ValueError, "x1"),
    ]
    for change, exc, needle in bad:
        kw = dict(arch_or_fn=ARCH, x1=x, store=None, progress=False)
        kw.update(change)
        with pytest.raises(exc, match=needle):
            ntkit.compute_kernel(kw.pop("arch_or_fn"), kw.pop("x1"), **kw)
    with pytest.raises(TypeError, match="dict"):          # tensor output but two names asked
        ntkit.compute_kernel(lambda a, b: a @ b.T, x, get=("a", "b"), store=None,
                             progress=False)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not an ntkit kernel store"):
        ntkit.compute_kernel(ARCH, x, store=str(tmp_path / "plain"), progress=False)
    with pytest.raises(ValueError, match="not an ntkit kernel store"):
        ntkit.compute_kernel(ARCH, x, store=str(tmp_path / "plain"), progress=False,
                             overwrite=True)
    assert (tmp_path / "plain" / "mine.txt").read_text() == "user data"
    for budget in (float("nan"), float("inf"), 0):
        with pytest.raises(ValueError, match="memory_budget"):
            ntkit.compute_kernel(ARCH, x, store=None, memory_budget=budget, progress=False)
    for bad_get in (("../x",), ("done",), ("sums",), (".hidden",)):
        with pytest.raises(ValueError, match="get"):
            ntkit.compute_kernel(two_kernels, x, get=bad_get, store=str(tmp_path / "g.zarr"),
                                 progress=False)
    assert not (tmp_path / "g.zarr").exists()
    with pytest.raises(FileNotFoundError, match="no kernel store"):
        open_store(str(tmp_path / "missing.zarr"))
    h = ntkit.compute_kernel(ARCH, x, store=None, progress=False)
    with pytest.raises(KeyError, match="holds"):
        h["kernel"]
    with pytest.raises(ValueError, match="say which"):
        h.load()

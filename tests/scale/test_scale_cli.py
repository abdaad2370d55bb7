"""`ntkit kernel` / `ntkit solve` / `ntkit kernel verify` on bad inputs: exit code 2 and one
line naming the flag (never a traceback), nothing written under a name other than the one given,
hints in CLI terms."""
import json
import os
import shutil

import numpy as np
import pytest

from ntkit.cli import main
from ntkit.scale._store import LOCK

ARCH_TEXT = "Dense(16, W_std=1.3), Relu(), Dense(1)"


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    np.save("x.npy", g.normal(size=(9, 3)))
    np.save("y.npy", g.normal(size=9))
    np.save("labels.npy", np.array([0, 1, 2, 1, 0, 2, 2, 1, 0]))
    return tmp_path


def kernel(*extra):
    return ["kernel", ARCH_TEXT, "x.npy", "--no-progress", *extra]


def test_bad_input_files(files, one_error_line):
    np.save("empty.npy", np.zeros((0, 3)))
    np.save("nofeat.npy", np.zeros((4, 0)))
    open("zero.npy", "wb").close()
    with open("junk.npy", "wb") as f:
        f.write(os.urandom(200))
    raw = open("x.npy", "rb").read()
    with open("trunc.npy", "wb") as f:
        f.write(raw[:-20])
    np.save("objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save("nan.npy", np.array([[1.0, np.nan, 0.0]] * 3))
    cases = [("empty.npy", "no examples"), ("nofeat.npy", "no features"),
             ("zero.npy", "empty file"), ("junk.npy", "not a .npy or .npz"),
             ("trunc.npy", "corrupt or truncated"), ("objects.npy", "Python objects"),
             ("nan.npy", "NaN/Inf")]
    for name, needle in cases:
        for store in ([], ["--store", "k.zarr"]):
            assert main(["kernel", ARCH_TEXT, name, "--no-progress", *store]) == 2, name
            err = one_error_line("kernel")
            assert needle in err and "pickled" not in err, err
            assert not os.path.exists("k.zarr")
    np.savez("two.npz", a=np.ones((3, 2)), b=np.ones((3, 2)))
    assert main(["kernel", ARCH_TEXT, "two.npz", "--no-progress"]) == 2
    assert "--data-key" in one_error_line("kernel")


def test_out_must_be_the_path_written(files, one_error_line):
    for out in ("t.txt", "k", "k.npz.bak"):
        assert main(kernel("--out", out)) == 2
        assert ".npy or .npz" in one_error_line("kernel")
    assert sorted(os.listdir(".")) == ["labels.npy", "x.npy", "y.npy"]
    assert main(kernel("--out", "nodir/k.npz")) == 2
    assert "does not exist" in one_error_line("kernel")
    assert main(kernel("--get", "ntk", "--out", "k1.npy")) == 0
    assert os.path.exists("k1.npy")


def test_store_is_a_file_and_memory_budget_echo(files, one_error_line):
    assert main(kernel("--store", "y.npy")) == 2
    assert "existing file" in one_error_line("kernel")
    assert np.load("y.npy").shape == (9,)
    for budget in ("-1", "0", "nan"):
        assert main(kernel("--store", "k.zarr", "--memory-budget", budget)) == 2
        err = one_error_line("kernel")
        assert "--memory-budget must be a positive size with a unit such as 512MB or 2GiB" \
            in err and repr(budget) in err, err
    # a bare number is bytes (the library's convention): a small one is refused, naming the unit
    assert main(kernel("--store", "k.zarr", "--memory-budget", "4")) == 2
    assert ("--memory-budget 4 would be 4 bytes; write a unit, e.g. --memory-budget 4GB"
            in one_error_line("kernel"))
    assert not os.path.exists("k.zarr")


def test_resume_hints_name_flags_and_dtype_change(files, capsys, one_error_line):
    assert main(kernel("--store", "k.zarr", "--get", "ntk", "--tile", "4")) == 0
    capsys.readouterr()
    assert main(kernel("--store", "k.zarr", "--get", "ntk", "--dtype", "float32")) == 2
    err = one_error_line("kernel")
    assert "dtype: stored 'float64', now 'float32'" in err and "x1:" not in err
    assert "--overwrite" in err and "--store" in err and "overwrite=True" not in err
    from ntkit.scale import KernelStore
    KernelStore("k.zarr", mode="r+")._done_arr[0, 1] = 0
    assert main(["solve", "--store", "k.zarr", "--y", "y.npy", "--no-progress"]) == 2
    err = one_error_line("solve")
    assert "incomplete" in err and "ntkit kernel ... --store k.zarr" in err
    assert "compute_kernel" not in err


def test_solve_errors(files, capsys, one_error_line):
    assert main(kernel("--store", "k.zarr", "--get", "ntk", "--tile", "4")) == 0
    capsys.readouterr()
    solve = ["solve", "--store", "k.zarr", "--no-progress"]
    cases = [(["--y", "y.npy", "--key", "nngp"], "--key 'nngp' is not in kernel store"),
             (["--y", "y.npy", "--out", "a.txt"], "--out a.txt"),
             (["--y", "y.npy", "--diag-reg", "-1"], "--diag-reg"),
             (["--y", "y5.npy"], "--y must be (n,)"),
             (["--y", "k.zarr"], "--y k.zarr is a folder"),
             (["--y", "y.npy", "--one-hot"], "non-integer"),
             (["--y", "y.npy", "--store", "y.npy"], "is a file, not a kernel store"),
             (["--y", "y.npy", "--method", "cholesky", "--scheduler", "local"],
              "--method cholesky factorizes in this process"),
             (["--y", "y.npy", "--method", "cg", "--scheduler", "local", "--workers", "0"],
              "--workers must be >= 1"),
             (["--y", "y.npy", "--method", "cg", "--scheduler", "host:1"],
              "--scheduler must be 'local' or an address")]
    np.save("neg.npy", np.array([0, 1, -1, 1, 0, 1, 0, 1, 0]))
    np.save("y5.npy", np.ones(5))
    cases.append((["--y", "neg.npy", "--one-hot"], "negative label -1"))
    for extra, needle in cases:
        assert main(solve + extra) == 2, extra
        err = one_error_line("solve")
        assert needle in err, err
    assert not os.path.exists("alpha.npy") and not os.path.exists("a.txt.npy")
    # integral float labels are fine and equal the integer ones
    np.save("flabels.npy", np.load("labels.npy").astype(float))
    for lab, out in (("labels.npy", "a1.npy"), ("flabels.npy", "a2.npy")):
        assert main(solve + ["--y", lab, "--one-hot", "--diag-reg", "1e-3", "--out", out]) == 0
    a1, a2 = np.load("a1.npy"), np.load("a2.npy")
    assert a1.shape == (9, 3) and np.array_equal(a1, a2)
    # CG that cannot converge: an error naming --diag-reg (not diag_reg=)
    assert main(solve + ["--y", "y.npy", "--method", "cg", "--maxiter", "1",
                         "--preconditioner", "none"]) == 2
    err = one_error_line("solve")
    assert "--diag-reg" in err and "diag_reg=" not in err and "--maxiter" in err


def test_verify_and_busy(files, capsys, one_error_line):
    assert main(kernel("--store", "k.zarr", "--get", "ntk", "--tile", "4")) == 0
    capsys.readouterr()
    assert main(["kernel", "verify", "k.zarr"]) == 0
    assert "all computed tiles match their checksums" in capsys.readouterr().out
    with open(os.path.join("k.zarr", "ntk", "c", "0", "1"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe")
    assert main(["kernel", "verify", "k.zarr", "--no-progress"]) == 2
    out = capsys.readouterr()
    assert "damaged tile (0, 1) of 'ntk'" in out.out and "1 damaged tile(s)" in out.err
    shutil.rmtree(os.path.join("k.zarr", "done"))
    assert main(["kernel", "verify", "k.zarr"]) == 2
    assert "'done' is missing" in capsys.readouterr().err
    assert main(["kernel", "status", "k.zarr"]) == 2
    assert "'done' is missing" in one_error_line("kernel")
    # a rerun repairs (ledger rebuilt from the checksums, the damaged tile recomputed)
    with pytest.warns(RuntimeWarning):
        assert main(kernel("--store", "k.zarr", "--get", "ntk", "--tile", "4")) == 0
    assert main(["kernel", "verify", "k.zarr"]) == 0
    capsys.readouterr()
    with open(os.path.join("k.zarr", LOCK), "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "token": "t", "since": "now"}, f)
    assert main(kernel("--store", "k.zarr", "--get", "ntk", "--tile", "4")) == 2
    err = one_error_line("kernel")
    assert "being written by" in err and "elsewhere" in err


def test_permission_error_is_a_message(files, one_error_line, monkeypatch):
    from ntkit.scale import _store

    def denied(self):
        raise PermissionError(13, "Permission denied", self.path)
    monkeypatch.setattr(_store.StoreLock, "acquire", denied)
    assert main(kernel("--store", "k.zarr")) == 2
    err = one_error_line("kernel")
    assert "Permission denied" in err or "permission denied" in err

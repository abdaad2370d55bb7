"""`ntkit lazy`, `ntkit predict` and `ntkit demo` end to end on tiny inputs; bad arguments give
a one-line error and exit code 2."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from ntkit.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------- lazy
def test_lazy_end_to_end(tmp_path, capsys):
    out = tmp_path / "lazy"
    rc = main(["lazy", "--widths", "8,32", "--seeds", "0", "--steps", "5", "--n", "6",
               "--dim", "2", "--alphas", "1,8", "--hessian-steps", "8", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("width_sweep.csv", "width_scaling.png", "width_training.png",
                 "alpha_sweep.csv", "alpha_scaling.png", "summary.txt"):
        assert (out / name).exists() and (out / name).stat().st_size > 0
        assert str(out / name) in text                     # paths printed at the end
    rows = list(csv.DictReader(open(out / "width_sweep.csv")))
    assert [int(r["width"]) for r in rows] == [8, 32]
    assert all(float(r["kappa"]) > 0 and float(r["rel_weight_change"]) > 0 for r in rows)
    assert "parameterization: ntk" in text
    # centered alpha sweep: kappa exactly ~ 1/alpha (same network)
    a = list(csv.DictReader(open(out / "alpha_sweep.csv")))
    assert float(a[0]["kappa"]) / float(a[1]["kappa"]) == pytest.approx(8.0, rel=1e-3)


def test_lazy_with_data_files(tmp_path, capsys):
    g = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", g.normal(size=(6, 3)))
    np.save(tmp_path / "y.npy", g.normal(size=6))
    rc = main(["lazy", "--arch", "Dense(16, W_std=1.5), Relu(), Dense(1)", "--widths", "8,16",
               "--seeds", "0", "--steps", "0", "--data", str(tmp_path / "x.npy"),
               "--targets", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o"),
               "--hessian-steps", "8", "--no-progress", "--format", "svg"])
    assert rc == 0
    assert (tmp_path / "o" / "width_scaling.svg").exists()
    assert not (tmp_path / "o" / "width_training.svg").exists()      # no training: no curves


@pytest.mark.parametrize("args, needle", [
    (["--widths", "8"], "--widths"),
    (["--widths", "8,x"], "--widths"),
    (["--lr", "-1"], "--lr"),
    (["--alphas", "1"], "--alphas"),
    (["--arch", "Dense(8), Bogus(), Dense(1)"], "Bogus"),
    (["--data", "missing.npy", "--targets", "y.npy"], "missing.npy"),
])
def test_lazy_bad_arguments(args, needle, one_error_line, tmp_path):
    assert main(["lazy", "--out", str(tmp_path / "o"), "--no-progress"] + args) == 2
    assert needle in one_error_line("lazy")


# ---------------------------------------------------------------------------------- predict
@pytest.fixture()
def kernel_files(tmp_path):
    g = np.random.default_rng(1)
    a = g.normal(size=(7, 4))
    b = g.normal(size=(3, 4))
    k = a @ a.T + 0.5 * np.eye(7)
    np.save(tmp_path / "k.npy", k)
    np.save(tmp_path / "kt.npy", b @ a.T)
    np.save(tmp_path / "y.npy", g.normal(size=(7, 2)))
    return tmp_path, k, b @ a.T, np.load(tmp_path / "y.npy")


def test_predict_flow_matches_eigen_solution(kernel_files, capsys):
    d, k, kt, y = kernel_files
    rc = main(["predict", "--k-train-train", str(d / "k.npy"), "--y-train", str(d / "y.npy"),
               "--k-test-train", str(d / "kt.npy"), "--t", "0,3,inf", "--learning-rate", "2",
               "--out", str(d / "p.npz"), "--no-progress"])
    assert rc == 0 and str(d / "p.npz") in capsys.readouterr().out
    p = np.load(d / "p.npz")
    assert p["fx_train"].shape == (3, 7, 2) and p["fx_test"].shape == (3, 3, 2)
    # independent oracle: f_t = y + V exp(-lam lr t / N) V^T (f_0 - y), f_0 = 0, N = y.size
    lam, V = np.linalg.eigh(k)
    N = y.size
    for i, t in enumerate([0.0, 3.0]):
        ft = y - V @ (np.exp(-lam * 2 * t / N)[:, None] * (V.T @ y))
        np.testing.assert_allclose(p["fx_train"][i], ft, rtol=1e-9, atol=1e-12)
        # test outputs: kt K^-1 (I - exp(-K lr t / N)) y
        gt = kt @ (V @ (((1 - np.exp(-lam * 2 * t / N)) / lam)[:, None] * (V.T @ y)))
        np.testing.assert_allclose(p["fx_test"][i], gt, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p["fx_test"][2], kt @ np.linalg.solve(k, y), rtol=1e-8)
    np.testing.assert_allclose(p["fx_train"][2], y, rtol=1e-8)


def test_predict_discrete_matches_gd_recursion(kernel_files):
    d, k, kt, y = kernel_files
    lr = 0.5
    assert main(["predict", "--k-train-train", str(d / "k.npy"), "--y-train", str(d / "y.npy"),
                 "--k-test-train", str(d / "kt.npy"), "--t", "0,1,5", "--discrete",
                 "--learning-rate", str(lr), "--out", str(d / "q.npz"), "--no-progress"]) == 0
    p = np.load(d / "q.npz")
    f, g = np.zeros_like(y), np.zeros((3, 2))
    N = y.size
    for step in range(6):          # GD on the linear model: f <- f - lr/N K (f - y)
        if step in (0, 1, 5):
            i = (0, 1, 5).index(step)
            np.testing.assert_allclose(p["fx_train"][i], f, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(p["fx_test"][i], g, rtol=1e-9, atol=1e-12)
        r = f - y
        f = f - lr / N * k @ r
        g = g - lr / N * kt @ r


@pytest.mark.parametrize("extra, needle", [
    (["--t", "1,x"], "--t"),
    (["--t", "-1"], "--t"),
    (["--k-test-train", "bad.npy"], "--k-test-train"),      # (3, 5) does not match n = 7
])
def test_predict_bad_arguments(kernel_files, extra, needle, one_error_line, monkeypatch):
    d, *_ = kernel_files
    monkeypatch.chdir(d)
    np.save(d / "bad.npy", np.zeros((3, 5)))
    rc = main(["predict", "--k-train-train", "k.npy", "--y-train", "y.npy", "--no-progress"]
              + extra)
    assert rc == 2 and needle in one_error_line("predict")


def test_predict_missing_file_and_shape(kernel_files, one_error_line):
    d, *_ = kernel_files
    assert main(["predict", "--k-train-train", str(d / "nope.npy"), "--y-train",
                 str(d / "y.npy")]) == 2
    assert "not found" in one_error_line("predict")
    np.save(d / "y5.npy", np.zeros(5))
    assert main(["predict", "--k-train-train", str(d / "k.npy"), "--y-train",
                 str(d / "y5.npy")]) == 2
    assert "--y-train" in one_error_line("predict")


def test_argparse_errors_exit_2():
    for args in (["lazy", "--steps", "abc"], ["predict"], ["lazy", "--format", "bmp"],
                 ["demo", "--bogus"]):
        r = subprocess.run([sys.executable, "-m", "ntkit.cli"] + args, capture_output=True,
                           text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert "error:" in r.stderr.splitlines()[-1]


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "ntkit.cli", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    for name in ("demo", "predict", "lazy"):
        assert name in r.stdout


def test_console_script_and_python_m_run_the_same_main():
    """pyproject's ``ntkit`` script, ``python -m ntkit`` and ``python -m ntkit.cli``."""
    import importlib
    import pathlib
    import re

    import ntkit
    import ntkit.cli
    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, func = re.search(r'^ntkit = "([\w.]+):(\w+)"$', text, re.M).groups()
    assert getattr(importlib.import_module(module), func) is ntkit.cli.main
    for name in ("ntkit", "ntkit.cli"):
        r = subprocess.run([sys.executable, "-m", name, "--version"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and r.stdout.strip() == f"ntkit {ntkit.__version__}", r.stderr


# ---------------------------------------------------------------------------------- demo
def test_demo_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    acc = [float(ln.split()[1]) for ln in text.splitlines() if ln.startswith(("NTK", "NNGP"))]
    assert len(acc) == 2 and min(acc) > 0.9
    assert text.strip().splitlines()[-1] == f"report: {out}"
    html = out.read_text(encoding="utf-8")
    from tests.test_report import assert_self_contained, open_in_browser
    srcs = assert_self_contained(html)
    assert len(srcs) >= 12
    for needle in ("Real networks vs the NTK prediction", "Accuracy", "Lazy training, measured",
                   "jacobian_norm", "kappa", "Pictures of the theory"):
        assert needle in html
    try:
        n, ok, err = open_in_browser(str(out), tmp_path)
    except pytest.skip.Exception:
        return
    assert n == ok == len(srcs) and err is None


def test_demo_bad_out_folder(one_error_line):
    assert main(["demo", "--quick", "--out", "/nonexistent/dir/r.html"]) == 2
    assert "folder does not exist" in one_error_line("demo")


# ---------------------------------------------------------------------------------- kernel, solve
ARCH_TEXT = "Dense(64, W_std=1.4, b_std=0.1), Relu(), Dense(1)"


def test_kernel_in_memory_and_store_agree(tmp_path, capsys):
    from ntkit.layers import parse_arch
    x = np.random.default_rng(3).normal(size=(23, 4))
    np.save(tmp_path / "x.npy", x)
    assert main(["kernel", ARCH_TEXT, str(tmp_path / "x.npy"), "--out", str(tmp_path / "k.npz"),
                 "--no-progress"]) == 0
    k = np.load(tmp_path / "k.npz")
    ref = parse_arch(ARCH_TEXT).kernel(torch.from_numpy(x))
    np.testing.assert_allclose(k["ntk"], ref.ntk.numpy(), rtol=1e-13)
    np.testing.assert_allclose(k["nngp"], ref.nngp.numpy(), rtol=1e-13)
    store = str(tmp_path / "k.zarr")
    assert main(["kernel", ARCH_TEXT, str(tmp_path / "x.npy"), "--store", store, "--tile", "8",
                 "--get", "ntk", "--no-progress"]) == 0
    assert "6/6 tiles done" in capsys.readouterr().out
    assert main(["kernel", "status", store]) == 0
    out = capsys.readouterr().out
    assert "6/6 tiles done (100.0%)" in out and "function: architecture" in out
    from ntkit.scale import open_store
    np.testing.assert_allclose(open_store(store).load("ntk").numpy(), k["ntk"], rtol=1e-13)
    # solve from the store, with predictions from a test-train store
    y = np.random.default_rng(4).normal(size=(23, 2))
    np.save(tmp_path / "y.npy", y)
    xt = np.random.default_rng(5).normal(size=(5, 4))
    np.save(tmp_path / "xt.npy", xt)
    kt_store = str(tmp_path / "kt.zarr")
    assert main(["kernel", ARCH_TEXT, str(tmp_path / "xt.npy"), "--x2", str(tmp_path / "x.npy"),
                 "--store", kt_store, "--get", "ntk", "--no-progress"]) == 0
    for method in ("cholesky", "cg"):
        assert main(["solve", "--store", store, "--y", str(tmp_path / "y.npy"), "--method",
                     method, "--diag-reg", "1e-3", "--tol", "1e-10", "--out",
                     str(tmp_path / "a.npy"), "--predict-store", kt_store, "--predict-out",
                     str(tmp_path / "p.npy"), "--no-progress"]) == 0
        assert f"ntkit solve: {method}" in capsys.readouterr().out
        kr = k["ntk"] + 1e-3 * np.mean(np.diag(k["ntk"])) * np.eye(23)
        alpha = np.linalg.solve(kr, y)
        np.testing.assert_allclose(np.load(tmp_path / "a.npy"), alpha, rtol=1e-6, atol=1e-8)
        kt = parse_arch(ARCH_TEXT).kernel(torch.from_numpy(xt), torch.from_numpy(x), get="ntk")
        np.testing.assert_allclose(np.load(tmp_path / "p.npy"), kt.numpy() @ alpha, rtol=1e-6,
                                   atol=1e-8)


@pytest.mark.parametrize("args, needle", [
    (["kernel", "Bogus(1)", "X"], "Bogus"),
    (["kernel", ARCH_TEXT, "missing.npy"], "missing.npy"),
    (["kernel", ARCH_TEXT, "X", "--get", "foo"], "--get"),
    (["kernel", ARCH_TEXT, "X", "--scheduler", "local"], "--store"),
    (["kernel", ARCH_TEXT, "X", "--store", "s.zarr", "--scheduler", "http://x"], "--scheduler"),
    (["kernel", ARCH_TEXT, "X", "--get", "nngp,ntk", "--out", "k.npy"], ".npz"),
    (["kernel", "status", "nope.zarr"], "nope.zarr"),
    (["solve", "--store", "nope.zarr", "--y", "y.npy"], "nope.zarr"),
])
def test_kernel_solve_bad_arguments(args, needle, one_error_line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((4, 3)))
    args = [str(tmp_path / "x.npy") if a == "X" else a for a in args]
    assert main(args + ["--no-progress"] if args[1] != "status" else args) == 2
    assert needle in one_error_line(args[0])


def test_kernel_mismatched_store_and_incomplete_solve(tmp_path, capsys, one_error_line):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(9, 3)))
    np.save(tmp_path / "y.npy", np.ones(9))
    store = str(tmp_path / "k.zarr")
    base = ["kernel", ARCH_TEXT, str(tmp_path / "x.npy"), "--store", store, "--get", "ntk",
            "--tile", "4", "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base[:-3] + ["--tile", "3", "--no-progress"]) == 2
    err = one_error_line("kernel")
    assert "tile: stored '4', now '3'" in err and "--overwrite" in err
    from ntkit.scale import KernelStore
    KernelStore(store, mode="r+")._done_arr[1, 2] = 0
    assert main(["solve", "--store", store, "--y", str(tmp_path / "y.npy"), "--no-progress"]) == 2
    assert "incomplete" in one_error_line("solve")


# ------------------------------------------------------------------ lazy: conv nets, run.json
CONV_TEXT = "Conv(16, 3, padding='SAME'), Relu(), GlobalAvgPool(), Dense(1)"


def _sha256(path):
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_lazy_conv_on_image_data_records_arch_and_data(tmp_path, capsys):
    import json
    import ntkit
    from ntkit.layers import parse_arch
    g = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", g.normal(size=(6, 3, 4, 4)))
    np.save(tmp_path / "y.npy", g.normal(size=6))
    out = tmp_path / "o"
    rc = main(["lazy", "--arch", CONV_TEXT, "--widths", "8,16", "--seeds", "0", "--steps", "2",
               "--alphas", "1,4", "--hessian-steps", "4", "--data", str(tmp_path / "x.npy"),
               "--targets", str(tmp_path / "y.npy"), "--out", str(out), "--no-progress"])
    assert rc == 0
    assert str(out / "run.json") in capsys.readouterr().out
    rec = json.loads((out / "run.json").read_text())
    assert rec["ntkit_version"] == ntkit.__version__
    assert rec["arch"]["text"] == CONV_TEXT
    assert rec["arch"]["parsed"] == repr(parse_arch(CONV_TEXT)) and "Conv(" in rec["arch"]["parsed"]
    d = rec["data"]
    assert d["source"] == "file" and d["path"] == str(tmp_path / "x.npy")
    assert d["sha256"] == _sha256(tmp_path / "x.npy") and d["x_shape"] == [6, 3, 4, 4]
    assert d["targets"]["sha256"] == _sha256(tmp_path / "y.npy")
    assert d["targets"]["shape"] == [6, 1]
    assert rec["input_shape"] == [3, 4, 4] and rec["output_shape"] == [1]
    assert (rec["widths"], rec["seeds"], rec["steps"], rec["lr"]) == ([8, 16], [0], 2, "auto")
    assert rec["alphas"] == [1.0, 4.0] and rec["alpha_width"] == 16
    # the width reached the conv layer: 3x3 filters 3 -> w channels, readout w -> 1, no biases
    runs = rec["runs"]["width"]
    assert [(r["width"], r["n_params"]) for r in runs] == [(w, 27 * w + w) for w in (8, 16)]
    assert all(r["learning_rate"] > 0 for r in runs + rec["runs"]["alpha"])
    rows = list(csv.DictReader(open(out / "width_sweep.csv")))
    assert [int(r["width"]) for r in rows] == [8, 16]
    assert all(float(r["kappa"]) > 0 and float(r["rel_weight_change"]) > 0 for r in rows)
    assert (out / "alpha_sweep.csv").exists()
    summary = (out / "summary.txt").read_text()
    assert CONV_TEXT in summary and d["sha256"] in summary and "(3, 4, 4)" in summary


@pytest.mark.parametrize("arch, extra, shape, note", [
    (CONV_TEXT, [], [3, 8, 8], True),                                      # default, said so
    ("Conv(8, 3), Relu(), Flatten(), Dense(1)", ["--image-shape", "2,5"], [2, 5], False),
])
def test_lazy_conv_on_synthetic_images(tmp_path, capsys, arch, extra, shape, note):
    import json
    out = tmp_path / "o"
    rc = main(["lazy", "--arch", arch, "--widths", "4,8", "--seeds", "3", "--steps", "0",
               "--n", "4", "--hessian-steps", "2", "--out", str(out), "--no-progress"] + extra)
    assert rc == 0
    text = capsys.readouterr().out
    assert ("--image-shape" in text.splitlines()[1]) == note
    rec = json.loads((out / "run.json").read_text())
    assert rec["data"]["source"] == "synthetic" and rec["data"]["kind"] == "images"
    assert rec["data"]["x_shape"] == [4] + shape and rec["data"]["seed"] == 0
    assert rec["input_shape"] == shape and rec["seeds"] == [3] and rec["steps"] == 0
    assert "synthetic images" in (out / "summary.txt").read_text()


def test_lazy_fully_connected_still_runs_and_records(tmp_path, capsys):
    import json
    g = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", g.normal(size=(6, 3)))
    np.save(tmp_path / "y.npy", g.normal(size=(6, 1)))
    text = "Dense(16), Erf(), Dense(1)"
    rc = main(["lazy", "--arch", text, "--widths", "8,16", "--seeds", "0,1", "--steps", "2",
               "--lr", "0.05", "--hessian-steps", "4", "--data", str(tmp_path / "x.npy"),
               "--targets", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["arch"]["text"] == text and rec["input_shape"] == [3]
    assert rec["data"]["sha256"] == _sha256(tmp_path / "x.npy")
    assert rec["lr"] == 0.05 and rec["seeds"] == [0, 1] and rec["alphas"] is None
    runs = rec["runs"]["width"]
    # 3 -> w -> 1 without biases; the fixed --lr is the one every run used
    assert [(r["width"], r["seed"], r["n_params"]) for r in runs] == [
        (w, s, 3 * w + w) for w in (8, 16) for s in (0, 1)]
    assert all(r["learning_rate"] == 0.05 for r in runs)
    # synthetic points: recorded as such
    assert main(["lazy", "--widths", "4,8", "--seeds", "0", "--steps", "0", "--n", "4",
                 "--dim", "2", "--hessian-steps", "2", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "p" / "run.json").read_text())
    assert rec["data"]["kind"] == "points" and rec["data"]["x_shape"] == [4, 2]

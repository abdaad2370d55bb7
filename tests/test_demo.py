"""`ntkit demo` runs end to end on a small split; bad arguments exit with code 2 naming the flag
before any work; the report never replaces a file ntkit did not write; `demo --help` imports
no torch; the report's sections agree where they report the same quantity, and every slope
whose theory value lies outside its CI gets a note."""
import argparse
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ntkit._demo as demo
from ntkit.cli import main

F64 = torch.float64


def test_demo_small(capsys):
    assert main(["demo", "--n-train", "300", "--depth", "1", "--no-progress", "--no-report",
                 "--quick"]) == 0
    out = capsys.readouterr().out
    assert "NTK" in out and "NNGP" in out
    acc = [float(line.split()[1]) for line in out.splitlines() if line.startswith(("NTK", "NNGP"))]
    assert len(acc) == 2 and min(acc) > 0.9  # kernel regression on digits is easy
    assert "(ReLU MLP, 1 hidden layer, 300 training images)" in out      # grammar
    assert "report" not in out                                          # --no-report


def test_bad_arguments_exit_2():
    r = subprocess.run([sys.executable, "-m", "ntkit.cli", "demo", "--n-train", "abc"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr
    assert main(["demo", "--n-train", "3"]) == 2


def _args(**kw):
    base = dict(n_train=None, depth=None, out="r.html", force=False, quick=True,
                no_report=False, no_progress=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("argv, flag", [
    (["--depth", "-1"], "--depth"), (["--depth", "0"], "--depth"),
    (["--n-train", "5"], "--n-train"), (["--n-train", "1797"], "--n-train"),
    (["--out", "report.txt"], "--out"), (["--out", "missing_dir/r.html"], "--out")])
def test_bad_demo_flags_named_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "kernel_regression_table",
                        lambda *a, **k: pytest.fail("work started before the flags were checked"))
    assert main(["demo", "--quick", "--no-progress"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkit demo: error: ") and flag in err[0]
    assert os.listdir(tmp_path) == []                      # nothing written
    # the same checks raise ValueError naming the flag when run() is called directly
    opts = {"--depth": "depth", "--n-train": "n_train", "--out": "out"}
    value = argv[1] if flag == "--out" else int(argv[1])
    with pytest.raises(ValueError, match=flag):
        demo.run(_args(**{opts[flag]: value}))


def test_depth_checked_in_library_functions():
    with pytest.raises(ValueError, match="`depth`"):
        demo.default_arch(depth=-1)
    with pytest.raises(ValueError, match="`n_train`"):
        demo.load_digits_split(5)


@pytest.fixture
def fast_demo(monkeypatch):
    """The demo with its computations replaced by a tiny report (the CLI logic is under test)."""
    from ntkit.report import Report
    rows = [dict(kernel="NNGP", test_accuracy=0.9, kernel_seconds=0.1, solve_seconds=0.01,
                 n_train=300, n_test=1497, dim=64)]
    monkeypatch.setattr(demo, "kernel_regression_table", lambda *a, **k: rows)
    monkeypatch.setattr(demo, "_build", lambda **k: Report("tiny report").text("fresh"))


def test_out_never_replaces_a_foreign_file(tmp_path, fast_demo, capsys):
    out = tmp_path / "mine.html"
    out.write_text("<html>my own page</html>")
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--force" in err and "already exists" in err
    assert out.read_text() == "<html>my own page</html>"
    # --force replaces it, and the path is printed
    assert main(["demo", "--quick", "--no-progress", "--force", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fresh" in out.read_text(encoding="utf-8")
    assert f"the report will be written to {out}" in text
    assert text.strip().splitlines()[-1] == f"report: {out}"
    # an earlier ntkit report is replaced without --force
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["mine.html"]    # no temporary file left behind


def test_default_report_path_is_printed_and_ignored_by_git(tmp_path, fast_demo, monkeypatch,
                                                           capsys):
    from ntkit.cli import _subparser, build_parser
    default = _subparser(build_parser(("demo",)), "demo").get_default("out")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"report: {tmp_path / default}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    for where in (default, os.path.join("some", "folder", default)):
        r = subprocess.run(["git", "check-ignore", "-q", where], cwd=root)
        assert r.returncode == 0, f"{where} is not ignored by git"


def test_demo_help_imports_no_torch():
    code = ("import sys\nfrom ntkit.cli import main\ntry:\n    main(['demo', '--help'])\n"
            "except SystemExit:\n    pass\nimport ntkit._demo\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"
    assert "--force" in r.stdout and "ntkit_report.html" in r.stdout


# ---- the report's numbers --------------------------------------------------------------------
def test_each_kernel_is_timed_on_its_own(monkeypatch):
    calls = []
    real = demo.default_arch

    class Spy:
        def __init__(self, arch):
            self.arch = arch

        def kernel(self, x, *a, get=None, **k):
            calls.append((get, len(x)))
            return self.arch.kernel(x, *a, get=get, **k)
    monkeypatch.setattr(demo, "default_arch", lambda depth: Spy(real(depth, width=16)))
    rows = demo.kernel_regression_table(n_train=40, depth=1, progress=False)
    assert [c[0] for c in calls] == ["ntk", "nngp", "ntk"] and calls[0][1] == 2  # warm-up first
    assert [r["kernel"] for r in rows] == ["NNGP", "NTK"]
    for r in rows:
        assert r["kernel_seconds"] > 0 and r["solve_seconds"] > 0
    assert rows[0]["kernel_seconds"] != rows[1]["kernel_seconds"]


def test_accuracy_table_agrees_with_the_dynamics_section():
    """Section 3's network and NTK-regression RMSEs are section 2's (same networks)."""
    from ntkit._dynamics_demo import train_and_compare
    x_tr, lab_tr, x_te, lab_te = demo.load_digits_split(30, seed=1)
    x_te, lab_te = x_te[:12], lab_te[:12]
    Y = torch.nn.functional.one_hot(lab_tr, 10).double() - 0.1
    Y_te = torch.nn.functional.one_hot(lab_te, 10).double() - 0.1
    arch = demo._dyn_arch()
    res = train_and_compare(arch, x_tr, Y, x_te, widths=(16, 64), steps=(2, 4), seeds=(0, 1),
                            y_test=Y_te)
    rows = demo._accuracy_rows(arch, x_tr, Y, x_te, lab_te, res, 4, res.learning_rate)
    nets = [r for r in rows if r["model"].startswith("networks")]
    assert [r["model"] for r in nets] == ["networks, width 16, 4 GD steps (2 initializations)",
                                          "networks, width 64, 4 GD steps (2 initializations)"]
    for r, rmse in zip(nets, res.network_test_rmse.tolist()):
        assert r["test RMSE"] == pytest.approx(rmse, rel=1e-12)
    ntk = [r for r in rows if r["model"].startswith("NTK regression")][0]
    assert ntk["test RMSE"] == pytest.approx(res.kernel_test_rmse, rel=1e-12)
    # each network's stored outputs are those its test RMSE was computed from
    outs = res.extra["test_outputs"]
    assert outs.shape == (2, 2, 12, 10)
    assert ((outs - Y_te) ** 2).mean(dim=(1, 2, 3)).sqrt().tolist() == pytest.approx(
        res.network_test_rmse.tolist(), rel=1e-12)


def test_common_slope_matches_least_squares_with_dummies():
    stats = pytest.importorskip("scipy.stats")
    from ntkit._dynamics_demo import _common_slope
    w = torch.tensor([64.0, 256.0, 1024.0, 4096.0], dtype=F64)
    g = torch.Generator().manual_seed(3)
    series = [c * w ** -0.5 * torch.exp(0.05 * torch.randn(4, generator=g, dtype=F64))
              for c in (0.3, 1.0, 2.0)]
    fit = _common_slope(w, series)
    # independent: one regression with a column of log w and one indicator per series
    lx = torch.log(w).repeat(3)
    X = torch.cat([lx[:, None], torch.kron(torch.eye(3, dtype=F64), torch.ones(4, 1, dtype=F64))],
                  dim=1)
    yv = torch.log(torch.cat(series))
    beta = torch.linalg.lstsq(X, yv[:, None]).solution[:, 0]
    resid = yv - X @ beta
    dof = 12 - 4
    cov = float((resid ** 2).sum()) / dof * torch.linalg.inv(X.T @ X)
    se = math.sqrt(float(cov[0, 0]))
    q = stats.t.ppf(0.975, dof)
    assert fit.slope == pytest.approx(float(beta[0]), rel=1e-10)
    b = float(beta[0])
    assert (fit.low, fit.high) == pytest.approx((b - q * se, b + q * se), rel=1e-6)


class _FakeSweep:
    """What _slope_rows/_slope_notes read from a LazySweep: rows, kind, slopes, theory."""

    def __init__(self, rows, slopes, theory, parameterization="standard"):
        self.rows, self.kind, self.slopes, self.theory = rows, "width", slopes, theory
        self.parameterization = parameterization


def test_every_slope_outside_its_ci_gets_a_note():
    from ntkit.diagnostics import fit_slope
    widths = [32, 128, 512]
    # gradient norm sqrt(c1 m + c0): slope below 1/2, approaching it at large m
    rows = [{"width": m, "jacobian_norm": math.sqrt(0.4 * m + 5.0) * (1 + 0.01 * s),
             "kappa": 1.0 / m * (1 + 0.02 * s)} for m in widths for s in (-1, 1)]
    slopes = {k: fit_slope([r["width"] for r in rows], [r[k] for r in rows])
              for k in ("jacobian_norm", "kappa")}
    sweep = _FakeSweep(rows, slopes, {"jacobian_norm": 0.5, "kappa": -1.0})
    table = demo._slope_rows(sweep, "width, standard")
    inside = {r["metric"]: r["theory in CI"] for r in table}
    assert inside == {"jacobian_norm": "no: see note", "kappa": "yes"}
    notes = demo._slope_notes([("width, standard", sweep)])
    assert len(notes) == 1 and notes[0].startswith("width, standard, jacobian_norm")
    s = slopes["jacobian_norm"]
    assert f"{s.slope:+.3f}" in notes[0] and f"[{s.low:+.3f}, {s.high:+.3f}]" in notes[0]
    tail = fit_slope([r["width"] for r in rows if r["width"] >= 128],
                     [r["jacobian_norm"] for r in rows if r["width"] >= 128]).slope
    assert f"slope is {tail:+.2f}, closer to the theory" in notes[0]
    assert "c1·m + c0" in notes[0]                          # the known explanation
    # a slope with no known explanation still gets a note, saying so
    sweep2 = _FakeSweep(rows, {"kappa": slopes["kappa"]}, {"kappa": -2.0}, "ntk")
    (note,) = demo._slope_notes([("width, NTK", sweep2)])
    assert "kappa" in note and "-2.00" in note

"""Every user error of `ntkit predict`, `ntkit lazy`, `ntkit demo` and the dispatcher exits with
code 2 and one line naming the flag (never a traceback, never exit 1), and writes nothing;
outputs are written exactly where named and never over a file ntkit did not write; diverging
training is an error, not a result; `--help` imports no torch."""
import builtins
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ntkit.cli as cli
from ntkit.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tree(d):
    """{relative path: bytes} of every file under ``d`` (to prove nothing was written)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with io.open(p, "rb") as fh:        # io.open: unaffected by a patched open
                out[os.path.relpath(p, d)] = fh.read()
    return out


def user_error(capsys, argv, *needles, cwd=None):
    """Run ``ntkit argv``: exit 2, one stderr line naming ``needles``, no file touched in
    ``cwd``."""
    before = tree(cwd) if cwd else None
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ntkit {argv[0]}: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if cwd:
        assert tree(cwd) == before
    return lines[0]


@pytest.fixture()
def d(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    a = g.normal(size=(6, 3))
    np.save(tmp_path / "k.npy", a @ a.T + 0.1 * np.eye(6))
    np.save(tmp_path / "y.npy", g.normal(size=6))
    np.save(tmp_path / "x.npy", g.normal(size=(6, 2)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


PRED = ["predict", "--k-train-train", "k.npy", "--y-train", "y.npy", "--no-progress",
        "--out", "p.npz"]
LAZY = ["lazy", "--widths", "4,8", "--seeds", "0", "--steps", "0", "--hessian-steps", "2",
        "--no-progress", "--out", "lz"]


def with_file(argv, flag, path):
    """``argv`` with ``flag``'s value replaced by (or set to) ``path``."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = path
    else:
        argv += [flag, path]
    if flag in ("--data", "--targets"):
        other = "--targets" if flag == "--data" else "--data"
        if other not in argv:
            argv += [other, "y.npy" if other == "--targets" else "x.npy"]
    return argv


BAD_INPUT_FLAGS = [(PRED, "--k-train-train"), (PRED, "--y-train"), (LAZY, "--data"),
                   (LAZY, "--targets")]


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("argv, flag", BAD_INPUT_FLAGS)
def test_empty_file(d, capsys, argv, flag):
    open(d / "empty.npy", "wb").close()
    user_error(capsys, with_file(argv, flag, "empty.npy"), flag, "empty.npy", "empty", cwd=d)


@pytest.mark.parametrize("argv, flag", BAD_INPUT_FLAGS)
def test_corrupt_file_is_not_called_pickled(d, capsys, argv, flag):
    (d / "bad.npy").write_bytes(b"this is no numpy file at all" * 4)
    msg = user_error(capsys, with_file(argv, flag, "bad.npy"), flag, "not a valid .npy or .npz",
                     cwd=d)
    assert "pickle" not in msg.lower()


@pytest.mark.parametrize("argv, flag", BAD_INPUT_FLAGS[:1] + BAD_INPUT_FLAGS[2:3])
def test_truncated_and_object_files(d, capsys, argv, flag):
    full = (d / "k.npy").read_bytes()
    (d / "trunc.npy").write_bytes(full[:len(full) // 2])
    user_error(capsys, with_file(argv, flag, "trunc.npy"), flag, "damaged .npy", cwd=d)
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    user_error(capsys, with_file(argv, flag, "obj.npy"), flag, "Python objects", cwd=d)
    np.save(d / "nan.npy", np.full((6, 6), np.nan))
    user_error(capsys, with_file(argv, flag, "nan.npy"), flag, "NaN/Inf", cwd=d)
    np.save(d / "zero.npy", np.zeros((0, 3)))
    user_error(capsys, with_file(argv, flag, "zero.npy"), flag, "empty array", cwd=d)


@pytest.mark.parametrize("argv, flag", BAD_INPUT_FLAGS)
def test_missing_file(d, capsys, argv, flag):
    user_error(capsys, with_file(argv, flag, "nope.npy"), flag, "not found", "nope.npy", cwd=d)


@pytest.mark.parametrize("argv, flag", BAD_INPUT_FLAGS[::2])
def test_unreadable_file(d, capsys, monkeypatch, argv, flag):
    real_open = builtins.open

    def guarded(path, *a, **k):
        if str(path).endswith("locked.npy"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    np.save(d / "locked.npy", np.eye(6))
    monkeypatch.setattr(builtins, "open", guarded)
    user_error(capsys, with_file(argv, flag, "locked.npy"), flag, "permission denied", cwd=d)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_unreadable_file_real_permissions(d, capsys):
    np.save(d / "locked.npy", np.eye(6))
    os.chmod(d / "locked.npy", 0)
    try:
        user_error(capsys, with_file(PRED, "--k-train-train", "locked.npy"), "--k-train-train",
                   "permission denied")
    finally:
        os.chmod(d / "locked.npy", 0o644)


def test_npz_entry_errors_name_the_key_flag(d, capsys):
    np.savez(d / "two.npz", a=np.eye(6), b=np.eye(6))
    msg = user_error(capsys, with_file(PRED, "--k-train-train", "two.npz"), "--k-train-train",
                     "a, b", "--key", cwd=d)
    assert "none named 'ntk'" in msg
    # lazy has no key flag: the message says how to name the entry instead of a made-up flag
    msg = user_error(capsys, with_file(LAZY, "--data", "two.npz"), "--data", "name the array 'x'",
                     cwd=d)
    assert "--key" not in msg and "--data-key" not in msg
    np.savez(d / "one.npz", whatever=np.eye(6))            # a single entry is taken
    assert main(with_file(PRED, "--k-train-train", "one.npz")) == 0


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("extra, needle", [
    (["--y-train", "y5.npy"], "--y-train"),
    (["--k-train-train", "rect.npy"], "--k-train-train"),
    (["--k-test-train", "rect.npy"], "--k-test-train"),
    (["--fx-train-0", "y5.npy"], "--fx-train-0"),
    (["--fx-test-0", "y.npy"], "--k-test-train"),          # fx-test-0 without a test kernel
    (["--discrete", "--t", "0,1.5"], "--t"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--diag-reg", "-1"], "--diag-reg"),
])
def test_predict_shape_and_value_errors(d, capsys, extra, needle):
    np.save(d / "y5.npy", np.zeros(5))
    np.save(d / "rect.npy", np.zeros((6, 5)))
    user_error(capsys, PRED + extra, needle, cwd=d)


@pytest.mark.parametrize("extra, needle", [
    (["--data", "x.npy", "--targets", "y5.npy"], "--targets"),
    (["--data", "x.npy"], "--targets"),
    (["--data", "x.npy", "--targets", "y63.npy"], "--targets has shape (6, 3)"),  # 1 output
    (["--targets", "y.npy"], "--data"),
    (["--n", "1"], "--n"),
    (["--dim", "0"], "--dim"),
    (["--hessian-steps", "0"], "--hessian-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--alphas", "1,2", "--alpha-width", "0"], "--alpha-width"),
    (["--alpha-width", "4"], "--alphas"),
    (["--lr", "inf"], "--lr"),
])
def test_lazy_shape_and_value_errors(d, capsys, extra, needle):
    np.save(d / "y5.npy", np.zeros(5))
    np.save(d / "y63.npy", np.zeros((6, 3)))
    user_error(capsys, LAZY + extra, needle, cwd=d)


# ---------------------------------------------------------------------------------- messages
def test_python_argument_names_become_flags(d, capsys):
    np.save(d / "kneg.npy", np.diag([1.0, -1.0, 0.5, 1, 1, 1]))   # not PSD: the hint names a ridge
    msg = user_error(capsys, with_file(PRED, "--k-train-train", "kneg.npy"), "--k-train-train",
                     "--diag-reg", cwd=d)
    assert "diag_reg" not in msg and "k_train_train" not in msg


def test_flag_words_rewrite_only_this_commands_flags():
    parser = cli.build_parser(("kernel",))
    words, _ = cli._flags(cli._subparser(parser, "kernel"))
    msg = cli._cli_words("pass compute_kernel(store=) a new path, `memory_budget`=2 or "
                         "memory_budget=1e9; `x` is unchanged, as is `overwrite_all`", words)
    assert msg == ("pass --store a new path, --memory-budget=2 or --memory-budget 1e9; `x` is "
                   "unchanged, as is `overwrite_all`")


def test_demo_python_name_becomes_flag(capsys):
    msg = user_error(capsys, ["demo", "--n-train", "5", "--no-report", "--no-progress"],
                     "--n-train")
    assert "n_train" not in msg


def test_multiline_message_is_one_paragraph_and_oserror_names_flag(d, capsys, monkeypatch):
    import ntkit.cli.predict as cp

    def boom(args):
        raise ValueError("first line\n   second line")
    monkeypatch.setattr(cp, "run", boom)
    assert user_error(capsys, PRED, cwd=d).endswith("error: first line second line")

    def denied(args):
        raise PermissionError(13, "Permission denied", os.path.abspath(args.out))
    monkeypatch.setattr(cp, "run", denied)
    user_error(capsys, PRED, "--out", "Permission denied", cwd=d)

    def oom(args):
        raise MemoryError()
    monkeypatch.setattr(cp, "run", oom)
    user_error(capsys, PRED, "not enough memory", cwd=d)


@pytest.mark.parametrize("exc", [RuntimeError("an internal bug"), KeyError("k"),
                                 AttributeError("x")])
def test_internal_errors_stay_visible(d, monkeypatch, exc):
    import ntkit.cli.predict as cp

    def bug(args):
        raise exc
    monkeypatch.setattr(cp, "run", bug)
    with pytest.raises(type(exc)):                 # a traceback and exit 1, not a polite exit 2
        main(PRED)


# ---------------------------------------------------------------------------------- writing
def test_out_wrong_suffix_is_refused(d, capsys):
    (d / "t.txt").write_text("precious")
    user_error(capsys, PRED[:-1] + ["t.txt"], "--out", ".npz", cwd=d)
    assert not (d / "t.txt.npz").exists() and (d / "t.txt").read_text() == "precious"


def test_out_written_exactly_and_never_over_a_foreign_file(d, capsys):
    (d / "p.npz").write_bytes(b"someone else's results")
    user_error(capsys, PRED, "--out", "--force", cwd=d)
    assert main(PRED + ["--force"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {d / 'p.npz'}" in out
    with np.load(d / "p.npz") as z:
        assert {"t", "fx_train"} <= set(z.files)
    assert main(PRED) == 0                          # our own earlier output may be replaced
    assert sorted(os.listdir(d)) == ["k.npy", "p.npz", "x.npy", "y.npy"]   # no temp left
    (d / "sub").mkdir()
    user_error(capsys, PRED[:-1] + ["sub"], "--out", cwd=d)   # a folder named like a file
    user_error(capsys, PRED[:-1] + ["nodir/p.npz"], "--out", "folder does not exist", cwd=d)


def test_out_write_permission(d, capsys, monkeypatch):
    real = os.open

    def guarded(path, *a, **k):
        if os.path.basename(str(path)).startswith(".ntkit-tmp-"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", guarded)
    user_error(capsys, PRED, "--out", "permission denied", cwd=d)
    monkeypatch.setattr(os, "open", real)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if os.path.abspath(p) == str(d)
                        else real_access(p, m, **k))
    user_error(capsys, PRED, "--out", "no permission", cwd=d)
    user_error(capsys, LAZY, "--out", "no permission", cwd=d)


def test_predict_nonfinite_output_is_refused(d, capsys, monkeypatch):
    """Whatever the predictor returns, NaN/Inf outputs are an error and are not written."""
    import ntkit.predict as pr
    real = pr.gradient_descent_mse

    def nan_flow(*a, **k):
        fn = real(*a, **k)
        return lambda *b: fn(*b) * float("nan")
    monkeypatch.setattr(pr, "gradient_descent_mse", nan_flow)
    user_error(capsys, PRED, "not finite", "--learning-rate", cwd=d)
    assert not (d / "p.npz").exists()


def test_predict_discrete_divergence(d, capsys):
    k, y = np.load(d / "k.npy"), np.load(d / "y.npy")
    limit = 2 * y.size / np.linalg.eigvalsh(k)[-1]       # |1 - lr lam / N| < 1 for every mode
    msg = user_error(capsys, PRED + ["--discrete", "--learning-rate", "100", "--t", "0,10"],
                     "--learning-rate", "stable limit", cwd=d)
    assert f"{limit:.6g}" in msg
    user_error(capsys, PRED + ["--discrete", "--learning-rate", repr(float(limit * 1.001)), "--t",
                               "0,inf"], "--learning-rate", cwd=d)
    assert main(PRED + ["--discrete", "--learning-rate", repr(float(limit * 0.99)), "--t",
                        "0,10,inf"]) == 0                    # just below the limit: fine
    with np.load(d / "p.npz") as z:
        assert np.isfinite(z["fx_train"]).all()


def test_lazy_divergence_full_batch_refused_before_training(d, capsys):
    user_error(capsys, LAZY[:6] + ["3"] + LAZY[7:] + ["--lr", "1e6", "--n", "6", "--dim", "2"],
               "--lr 1e6", "stable limit", cwd=d)
    assert not (d / "lz").exists()


def test_lazy_divergence_sgd_detected_after_training(d, capsys):
    argv = LAZY[:6] + ["3"] + LAZY[7:] + ["--lr", "1e6", "--n", "6", "--dim", "2",
                                         "--batch-size", "3"]
    msg = user_error(capsys, argv, "--lr", cwd=d)
    assert "diverged" in msg
    assert not (d / "lz").exists()


def test_lazy_out_folder_safety(d, capsys):
    (d / "afile").write_text("x")
    user_error(capsys, LAZY[:-1] + ["afile"], "--out", "not a folder", cwd=d)
    (d / "lz").mkdir()
    (d / "lz" / "summary.txt").write_text("my notes")
    user_error(capsys, LAZY, "--out", "summary.txt", "--force", cwd=d)
    small = ["--n", "4", "--dim", "2"]
    assert main(LAZY + small) == 2                  # nothing was changed by the refusal
    assert (d / "lz" / "summary.txt").read_text() == "my notes"
    capsys.readouterr()
    assert main(LAZY + small + ["--force"]) == 0
    capsys.readouterr()
    assert (d / "lz" / "summary.txt").read_text() != "my notes"
    manifest = json.loads((d / "lz" / ".ntkit_manifest.json").read_text())
    assert "summary.txt" in manifest["files"]
    assert main(LAZY + small) == 0                  # own unchanged outputs: replaced freely
    capsys.readouterr()
    (d / "lz" / "width_sweep.csv").write_text("edited by hand")
    user_error(capsys, LAZY + small, "--out", "width_sweep.csv", cwd=d)
    assert not [f for f in os.listdir(d / "lz") if f.startswith(".ntkit-tmp")]


# ---------------------------------------------------------------------------------- arch text
@pytest.mark.parametrize("text, part", [
    ("Dense(8) + 1", "'Dense(8) + 1'"),
    ("Dense(8), x", "'x'"),
    ("nl.Dense(8)", "'nl.Dense'"),
    ("Dense(*w)", "'*w'"),
    ("Dense(8), Relu", "Relu(...)"),
    ("Dense(1e400)", "'1e400'"),
    ("lambda x: x", "'lambda x: x'"),
])
def test_arch_unsupported_expression_quotes_the_part(d, capsys, text, part):
    msg = user_error(capsys, LAZY + ["--arch", text], "--arch", part, cwd=d)
    assert "ctx=" not in msg and "Load()" not in msg and "BinOp" not in msg


def test_arch_known_layers_are_only_layers(d, capsys):
    msg = user_error(capsys, LAZY + ["--arch", "Dense(8), Relux(), Dense(1)"], "--arch",
                     "'Relux'", "did you mean 'Relu'", cwd=d)
    known = msg.split("known layers: ")[1].split(", ")
    assert "parse_arch" not in known and "from_torch" not in known
    assert {"Dense", "Relu", "Erf", "serial", "parallel", "Conv"} <= set(known)
    from ntkit.layers import Layer
    from ntkit.layers._parse import _layer_names
    for name, ctor in _layer_names().items():
        assert name in known
        if isinstance(ctor, type):
            assert issubclass(ctor, Layer)

    # the vocabulary is read from the family modules (not the package, which imports the
    # parser): it must be exactly ntkit.layers' public layer constructors
    import ntkit.layers as nl
    public = {n for n in nl.__all__ if n not in ("Layer", "Activation", "Elementwise",
                                                  "parse_arch", "from_torch",
                                                  "Slice")}  # (an index builder for Index)
    assert set(_layer_names()) == public
    assert all(_layer_names()[n] is getattr(nl, n) for n in public)


# ---------------------------------------------------------------------------------- help
def test_help_imports_no_torch():
    code = ("import sys\nfrom ntkit.cli import main\n"
            "for argv in ([], ['--help'], ['predict', '--help'], ['lazy', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"
    for name, _, _ in cli.COMMANDS:
        assert name in r.stdout


def test_command_table_matches_the_modules():
    parser = cli.build_parser()
    for a in parser._actions:
        if hasattr(a, "_choices_actions"):
            helps = {c.dest: c.help for c in a._choices_actions}
    assert {n: h for n, _, h in cli.COMMANDS} == {n: helps[n] for n, _, _ in cli.COMMANDS}
    for n, _, _ in cli.COMMANDS:                   # each command alone parses its own flags
        p = cli.build_parser((n,))
        assert cli._subparser(p, n)._actions[1:], n


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_subcommand_help_imports_no_torch():
    """``ntkit COMMAND --help`` for every command stays fast: no torch import (numpy is allowed
    for the commands that parse arrays)."""
    names = [n for n, _, _ in cli.COMMANDS]
    code = ("import sys\nfrom ntkit.cli import main\n"
            f"for name in {names!r}:\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------- lazy: architecture vs data shape
CONV = "Conv(4, 3, padding='SAME'), Relu(), GlobalAvgPool(), Dense(1)"


@pytest.mark.parametrize("extra, needles", [
    (["--arch", CONV, "--data", "x.npy", "--targets", "y.npy"],            # (n, d) for a Conv
     ["--arch", "--data", "images", "start --arch with Dense"]),
    (["--arch", "Dense(4), Relu(), Dense(1)", "--data", "img.npy", "--targets", "y.npy"],
     ["--arch", "--data", "(1, 2, 2)", "Flatten()"]),                      # spatial output
    (["--arch", "Conv(4, 3), Relu(), GlobalAvgPool(), Dense(1)", "--data", "img.npy",
      "--targets", "y.npy"], ["--arch", "--data", "padding='SAME'"]),      # filter > image
    (["--arch", "Conv(4, (3, 3)), Relu(), Flatten(), Dense(1)", "--data", "seq.npy",
      "--targets", "y.npy"], ["--arch", "--data", "1 spatial dimension"]),  # 2-D filter, 1-D data
    (["--arch", CONV, "--dim", "3"], ["--dim", "Conv", "--image-shape"]),
    (["--arch", "Dense(4), Relu(), Dense(1)", "--image-shape", "2,5"],
     ["--arch", "--image-shape", "Flatten()"]),
    (["--arch", CONV, "--image-shape", "3,4,4", "--data", "img.npy", "--targets", "y.npy"],
     ["--image-shape", "--data"]),
    (["--arch", CONV, "--image-shape", "3"], ["--image-shape", "C,H,W"]),
    (["--arch", CONV, "--image-shape", "3,0,4"], ["--image-shape", ">= 1"]),
])
def test_lazy_arch_must_fit_data_shape(d, capsys, extra, needles):
    g = np.random.default_rng(2)
    np.save(d / "img.npy", g.normal(size=(6, 3, 2, 2)))
    np.save(d / "seq.npy", g.normal(size=(6, 2, 5)))
    user_error(capsys, LAZY + extra, *needles, cwd=d)

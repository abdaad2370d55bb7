"""Project contract: the README's test command is what CI runs; the public surface imports."""
import pathlib
import re

import ntkit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    main_job, tests = cmds
    assert "torch==2.13.0" in main_job and "ntkit demo" in main_job
    assert "torch==2.13.0" in tests and "pytest" in tests
    assert main_job.index("torch==2.13.0") < main_job.index("pip install -e")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci


def test_public_names_resolve():
    for name in ["Kernel", "monte_carlo_kernel", "layers", "__version__"]:
        assert getattr(ntkit, name) is not None
    assert set(ntkit.layers.__all__) <= set(dir(ntkit.layers))


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)   # the examples write stores to the working directory
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    ns = {"__name__": "__main__"}     # as a script: main guards run
    for code in blocks:
        code = code.replace("width=4096", "width=256")     # keep the test fast
        exec(compile(code, "README.md", "exec"), ns)


def test_every_public_name_resolves():
    for name in ntkit.__all__:
        assert getattr(ntkit, name) is not None, name


def _fixture_bodies(path):
    """``{name: source}`` of the ``@pytest.fixture`` functions defined in ``path``."""
    import ast
    text = path.read_text()
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and any(
                "fixture" in ast.unparse(d) for d in node.decorator_list):
            body = "\n".join(ast.unparse(s) for s in node.body
                             if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)))
            out[node.name] = body
    return out


def test_no_test_file_copies_a_conftest_fixture():
    """A fixture of tests/conftest.py is used from there (by name, or with
    ``pytest.mark.usefixtures``), not copied into a test file under its name or another one
    (issue 17: one_thread was copied into five files)."""
    tests = ROOT / "tests"
    shared = _fixture_bodies(tests / "conftest.py")
    assert {"one_thread", "randn64", "small_fc_arch"} <= set(shared)
    by_body = {body: name for name, body in shared.items()}
    copies = []
    for path in sorted(tests.rglob("test_*.py")):
        for name, body in _fixture_bodies(path).items():
            if name in shared or body in by_body:
                copies.append(f"{path.relative_to(ROOT)}::{name} (tests/conftest.py::"
                              f"{by_body.get(body, name)})")
    assert not copies, f"use the conftest fixture instead of a copy: {copies}"

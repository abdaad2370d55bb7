"""`ntkit demo` runs end to end on a small split; bad arguments exit with code 2."""
import subprocess
import sys

from ntkit.cli import main


def test_demo_small(capsys):
    assert main(["demo", "--n-train", "300", "--depth", "1", "--no-progress", "--no-report", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "NTK" in out and "NNGP" in out
    acc = [float(line.split()[1]) for line in out.splitlines() if line.startswith(("NTK", "NNGP"))]
    assert len(acc) == 2 and min(acc) > 0.9  # kernel regression on digits is easy


def test_bad_arguments_exit_2():
    r = subprocess.run([sys.executable, "-m", "ntkit.cli", "demo", "--n-train", "abc"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr
    assert main(["demo", "--n-train", "3"]) == 2

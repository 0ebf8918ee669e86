"""`ddpm-fast bench` from a non-editable install in a fresh venv (issue 15): the benchmark is part
of the installed package, not a file that only a source checkout has."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.name != "posix", reason="venv layout (bin/) of POSIX systems")
def test_bench_runs_from_an_installed_wheel(tmp_path):
    # A pure-Python wheel (DDPM_FAST_NATIVE=OFF): compiling ddpm_fast._C takes a minute, and the
    # package runs on its torch paths without it. Built from a copy of the sources, so that the
    # checkout is left as it is; nothing is downloaded (--no-index, --no-deps: the venv sees this
    # environment's torch through --system-site-packages).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "ddpm_fast", src / "ddpm_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DDPM_FAST_NATIVE"] = "OFF"
    pip = ["-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([sys.executable, *pip, "wheel", "--no-index", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("ddpm_fast-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, *pip, "install", "--no-index", "--no-deps", str(wheel)],
                   check=True, env=env, cwd=tmp_path)

    assert list(venv.glob("lib/python*/site-packages/ddpm_fast/bench.py"))
    elsewhere = tmp_path / "elsewhere"          # not the checkout: none of it on sys.path
    elsewhere.mkdir()
    shown = subprocess.run([str(venv / "bin" / "ddpm-fast"), "bench", "--help"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: ddpm-fast bench") and "--providers" in shown.stdout

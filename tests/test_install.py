"""`ddpm-fast bench` from a non-editable install in a fresh venv (issue 15): the benchmark is part
of the installed package, not a file that only a source checkout has."""
import os
import shutil
import site
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
    # environment's torch through a .pth file, below).
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
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies (torch, ...) are this interpreter's. --system-site-packages would not do:
    # run from a venv, it gives the new venv the *base* interpreter's site-packages, not this
    # venv's. A .pth file lists this interpreter's site directories instead, after the new venv's
    # own. Its lines are plain paths: .pth files in those directories are not read, so an editable
    # install of the checkout there does not leak into the new venv.
    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        site_dirs.append(site.getusersitepackages())
    venv_site, = venv.glob("lib/python*/site-packages")
    (venv_site / "_ddpm_fast_test_deps.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    python = str(venv / "bin" / "python")
    # --ignore-installed: a ddpm_fast 0.1.0 installed in this environment (pip install .) is seen
    # through the .pth file, and pip would skip the wheel as "already installed".
    subprocess.run([python, *pip, "install", "--no-index", "--no-deps", "--ignore-installed",
                    str(wheel)], check=True, env=env, cwd=tmp_path)

    assert list(venv.glob("lib/python*/site-packages/ddpm_fast/bench.py"))
    elsewhere = tmp_path / "elsewhere"          # not the checkout: none of it on sys.path
    elsewhere.mkdir()
    found = subprocess.run([python, "-c", "import ddpm_fast; print(ddpm_fast.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(venv), found.stdout  # the wheel's copy
    shown = subprocess.run([str(venv / "bin" / "ddpm-fast"), "bench", "--help"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: ddpm-fast bench") and "--providers" in shown.stdout

"""The first build's helpers: the digest that decides a full rebuild, pip's progress, and the
kernel's quiet start.

- ``scripts/book_inputs.py``: its digest changes with any source of the package or the build's
  configuration, and not with what Python leaves behind or a bare time stamp, so `make book`
  re-executes the chapters exactly when something they run changed.
- ``scripts/pip_install.py``: runs the real pip, reports the packages it installed, what it
  had to do nothing for, and a failure with pip's own words.
- ``scripts/ipython/ipython_kernel_config.py``: drops ipykernel's unencrypted-TCP notice only
  for a kernel on loopback, and a real kernel started for a notebook prints it no more.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import book_inputs  # noqa: E402
import pip_install  # noqa: E402

TCP_NOTICE = "Kernel is running over TCP without encryption"
KERNEL_CONFIG = ROOT / "scripts" / "ipython" / "ipython_kernel_config.py"


# --- the book's inputs ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small checkout: the package's sources and the build's configuration."""
    (tmp_path / "src" / "deliverylab" / "engine").mkdir(parents=True)
    (tmp_path / "src" / "deliverylab" / "__init__.py").write_text("__version__ = '1'\n")
    (tmp_path / "src" / "deliverylab" / "engine" / "schema.sql").write_text("CREATE TABLE t(x);\n")
    for name in book_inputs.FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    return tmp_path


def test_the_digest_follows_the_package_and_the_configuration(tree: Path) -> None:
    first = book_inputs.digest(tree)
    assert book_inputs.digest(tree) == first  # the same files, the same digest
    changes = [
        lambda: (tree / "src/deliverylab/__init__.py").write_text("__version__ = '2'\n"),
        lambda: (tree / "src/deliverylab/engine/schema.sql").write_text("CREATE TABLE u(x);\n"),
        lambda: (tree / "src/deliverylab/engine/new.py").write_text(""),
        lambda: (tree / "_config.yml").write_text("title: another\n"),
        lambda: (tree / "_toc.yml").write_text("root: other\n"),
        lambda: (tree / "requirements.txt").write_text("pandas==0\n"),
        lambda: (tree / "src/deliverylab/engine/schema.sql").rename(
            tree / "src/deliverylab/engine/schema2.sql"),
    ]
    seen = {first}
    for change in changes:
        change()
        digest = book_inputs.digest(tree)
        assert digest not in seen, f"the digest missed a change ({change})"
        seen.add(digest)


def test_the_digest_ignores_what_python_leaves_and_time_stamps(tree: Path) -> None:
    first = book_inputs.digest(tree)
    cache = tree / "src" / "deliverylab" / "__pycache__"
    cache.mkdir()
    (cache / "__init__.cpython-311.pyc").write_bytes(b"\x00compiled")
    (tree / "src" / "deliverylab.egg-info").mkdir()
    (tree / "src" / "deliverylab.egg-info" / "PKG-INFO").write_text("Name: deliverylab\n")
    os.utime(tree / "src" / "deliverylab" / "__init__.py", (1, 1))
    assert book_inputs.digest(tree) == first


def test_the_digest_of_this_checkout_is_printed() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "book_inputs.py")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == book_inputs.digest(ROOT) and len(out) == 64
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "book_inputs.py"), "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no arguments" in bad.stderr


# --- pip, with progress --------------------------------------------------------------------


def run_pip_install(*args: str, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pip_install.py"),
                           "--log", str(log), *args],
                          capture_output=True, text=True, timeout=300, cwd=log.parent)


def tiny_wheel(where: Path) -> Path:
    """A wheel of one module, made by hand: what pip installs, with nothing to download."""
    wheel = where / "tiny_pkg-0.1-py3-none-any.whl"
    info = "tiny_pkg-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny_pkg.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"tiny_pkg.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n"
                                     f"{info}/RECORD,,\n")
    return wheel


def test_pip_install_reports_what_it_installed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    result = run_pip_install("--no-index", "--no-deps", "--target", str(target),
                             str(tiny_wheel(tmp_path)), log=tmp_path / "pip.log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "collecting  1  tiny_pkg==0.1" in result.stdout
    assert "installed 1 package in" in result.stdout
    assert (target / "tiny_pkg.py").is_file()
    log = (tmp_path / "pip.log").read_text()
    assert "Successfully installed tiny-pkg-0.1" in log  # pip's own words, kept in the log


def test_pip_install_says_when_there_is_nothing_to_do(tmp_path: Path) -> None:
    version = importlib.metadata.version("pytest")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(f"# pinned\npytest=={version}\n\n")
    assert pip_install.count_requirements(["-r", str(reqs)]) == 1
    result = run_pip_install("--no-index", "-r", str(reqs), log=tmp_path / "pip.log")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to install: already up to date" in result.stdout


def test_pip_install_shows_pips_error_and_its_status(tmp_path: Path) -> None:
    result = run_pip_install("--no-index", "no-such-package-deliverylab==0.0.1",
                             log=tmp_path / "pip.log")
    assert result.returncode != 0
    assert "pip failed (exit" in result.stdout and "pip.log" in result.stdout
    # pip's own error reaches the terminal, not only the log.
    assert "No matching distribution found for no-such-package-deliverylab" in result.stdout
    assert "no-such-package-deliverylab" in (tmp_path / "pip.log").read_text()


def test_pip_install_refuses_a_call_without_arguments(tmp_path: Path) -> None:
    result = run_pip_install(log=tmp_path / "pip.log")
    assert result.returncode == 2 and "usage:" in result.stderr


# --- the kernel's notice about TCP ---------------------------------------------------------

LOG_AS_THE_KERNEL = """
import logging, runpy, sys
from ipykernel.kernelapp import IPKernelApp
runpy.run_path(sys.argv[1])
logging.basicConfig(format="[%(name)s] %(levelname)s | %(message)s")
IPKernelApp.instance(ip=sys.argv[2])
log = logging.getLogger("IPKernelApp")
log.warning("Kernel is running over TCP without encryption. All communication is plain text.")
log.warning("another warning")
"""


@pytest.mark.parametrize(("ip", "shown"), [("127.0.0.1", False), ("::1", False),
                                           ("0.0.0.0", True), ("192.0.2.7", True)])
def test_the_notice_is_dropped_only_on_loopback(ip: str, shown: bool) -> None:
    result = subprocess.run([sys.executable, "-c", LOG_AS_THE_KERNEL, str(KERNEL_CONFIG), ip],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (TCP_NOTICE in result.stderr) is shown, result.stderr
    assert "another warning" in result.stderr  # nothing else is touched


@pytest.mark.slow
def test_a_real_kernel_starts_without_the_notice(tmp_path: Path) -> None:
    installed = Path(sys.prefix) / "etc" / "ipython" / "ipython_kernel_config.py"
    assert installed.is_file() and installed.read_bytes() == KERNEL_CONFIG.read_bytes(), (
        f"{installed} is missing or stale: `make setup` installs it")
    notebook = tmp_path / "one.ipynb"
    notebook.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
                   "outputs": [], "source": "print(6 * 7)"}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))
    env = {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"}
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent))
    assert jupyter is not None
    result = subprocess.run([jupyter, "nbconvert", "--to", "notebook", "--execute",
                             "--output", "ran.ipynb", str(notebook)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "42" in (tmp_path / "ran.ipynb").read_text()  # the kernel really ran the cell
    assert TCP_NOTICE not in result.stderr, result.stderr

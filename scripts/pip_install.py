"""`pip install`, saying what it does and how far it is.

Setting up `.venv/` installs about 170 pinned packages: pip first collects them (downloading
what it has not cached), then installs them all, which takes most of the time and prints
nothing. Its full output is hundreds of lines; `--quiet` is a minute of silence. This wrapper
runs `python -m pip install ARGS` with the Python it runs under, keeps pip's full output in a
log file, and shows one line of progress instead: packages collected, then packages installed
(counted as their `.dist-info` folders appear in site-packages). pip's errors are shown as they
come, its warnings counted (both are in the log); on failure the log's last lines are shown.

    python scripts/pip_install.py --log .venv/pip-install.log -r requirements.txt

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path


def count_requirements(args: list[str]) -> int | None:
    """How many packages the ``-r FILE`` arguments pin (None when there is no ``-r``)."""
    total = None
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-r", "--requirement"):
            lines = Path(value).read_text(encoding="utf-8").splitlines()
            n = sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))
            total = (total or 0) + n
    return total


def package_name(what: str) -> str:
    """``name==version`` as pip was asked, or the name and version of a wheel file it uses."""
    if what.endswith(".whl"):
        return "==".join(Path(what).name.split("-")[:2])
    return what


def installed_since(site: Path, since: float) -> int:
    """How many packages have been installed into ``site`` since the time ``since``: each
    one's ``.dist-info`` folder is made new, an upgrade's too (the old one is removed)."""
    n = 0
    for info in site.glob("*.dist-info"):
        try:
            n += info.stat().st_mtime >= since
        except OSError:  # removed while we looked: an upgrade in progress
            pass
    return n


class Progress:
    """One line, rewritten in place on a terminal; on a log or CI, a line now and then."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""
        self.last_print = 0.0
        self.lock = threading.Lock()

    def show(self, text: str, *, force: bool = False) -> None:
        with self.lock:
            if text == self.last:
                return
            self.last = text
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
            elif force or time.monotonic() - self.last_print >= 10:
                self.stream.write(text + "\n")
                self.stream.flush()
                self.last_print = time.monotonic()

    def done(self, text: str) -> None:
        with self.lock:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log_path = Path(".venv/pip-install.log")
    if args[:1] == ["--log"]:
        if len(args) < 2:
            print("pip_install: --log needs a file name", file=sys.stderr)
            return 2
        log_path = Path(args[1])
        args = args[2:]
    if not args:
        print("usage: python scripts/pip_install.py [--log FILE] PIP_INSTALL_ARGS…",
              file=sys.stderr)
        return 2
    total = count_requirements(args)
    site = Path(sysconfig.get_paths()["purelib"])
    progress = Progress()
    start = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", *args]
    collected = 0
    installing_since: float | None = None  # when the install phase began
    to_install = 0
    stop = threading.Event()

    def watch_install() -> None:
        # pip prints nothing while it installs; count what lands in site-packages instead.
        while not stop.wait(0.5):
            if installing_since is not None:
                n = installed_since(site, installing_since)
                progress.show(f"  installing  {min(n, to_install)}/{to_install} packages"
                              f"  ({time.monotonic() - start:.0f} s)")

    watcher = threading.Thread(target=watch_install, daemon=True)
    watcher.start()
    warnings = 0
    log_lock = threading.Lock()
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        assert proc.stdout is not None and proc.stderr is not None

        def read_stderr() -> None:
            # pip's complaints: every line goes to the log; errors are shown at once, and
            # warnings (a machine's pip configuration can print hundreds) are counted.
            nonlocal warnings
            for line in proc.stderr:
                with log_lock:
                    log.write(line)
                    log.flush()
                if line.startswith("WARNING"):
                    warnings += 1
                elif line.strip():
                    progress.done(line.rstrip("\n"))

        errors = threading.Thread(target=read_stderr, daemon=True)
        errors.start()
        for line in proc.stdout:
            with log_lock:
                log.write(line)
                log.flush()
            if line.startswith(("Collecting ", "Processing ", "Obtaining ")):
                collected += 1
                name = package_name(line.split()[1])
                # A package built from source may pull in its build tools beyond the pinned list.
                of = f"/{total}" if total and collected <= total else ""
                progress.show(f"  collecting  {collected}{of}  {name}"
                              f"  ({time.monotonic() - start:.0f} s)")
            elif line.startswith("Installing collected packages:"):
                to_install = len(line.split(":", 1)[1].split(","))
                # A second early: a file system's time stamps may be coarser than the clock.
                installing_since = time.time() - 1
                progress.show(f"  installing  0/{to_install} packages"
                              f"  ({time.monotonic() - start:.0f} s)", force=True)
        status = proc.wait()
        errors.join()
    stop.set()
    watcher.join()
    elapsed = time.monotonic() - start
    if status != 0:
        progress.done(f"  pip failed (exit {status}) after {elapsed:.0f} s; its output is in"
                      f" {log_path}. The last lines:")
        tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
        print("\n".join("    " + line for line in tail))
        return status
    said = f"{warnings} warning(s) from pip; " if warnings else ""
    if to_install:
        plural = "" if to_install == 1 else "s"
        progress.done(f"  installed {to_install} package{plural} in {elapsed:.0f} s"
                      f" ({said}pip's output: {log_path})")
    else:
        progress.done(f"  nothing to install: already up to date ({said}{elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

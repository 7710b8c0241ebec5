"""Fetch the JavaScript the built book serves itself, so its HTML loads nothing from a CDN.

By default myst-nb loads require.js and the ipywidgets embed manager from public CDNs, and
Sphinx loads MathJax from one. This script downloads pinned releases of those packages from
the npm registry with `npm pack` (no dependency tree, no install scripts), checks each
tarball against the integrity hash pinned below, and lays out the needed files in
`build/web/`. `_config.yml` lists that folder in `html_extra_path`, so Sphinx copies it to
the root of `_build/html/`:

    _build/html/_widgets/require.js                   <- requirejs
    _build/html/_widgets/widgets-setup.js             <- scripts/web/widgets-setup.js
    _build/html/_widgets/html-manager/embed-amd.js    <- @jupyter-widgets/html-manager
    _build/html/_mathjax/tex-chtml.js                 <- mathjax (es5 build)

They are deliberately not under `_static/`: Jupyter Book adds every `_static/**/*.js` to
every page, which would load the widget manager twice and render every widget twice.

Run it again and it does nothing unless a pin changed. Usage:

    python scripts/fetch_web_assets.py [--dest build/web]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Asset:
    """One npm package and which of its files go where in the built book."""

    name: str
    version: str
    integrity: str  # the registry's "sha512-…" of the tarball
    # (path inside the package, destination relative to the web root); a directory is
    # copied whole, less anything matching IGNORE.
    files: tuple[tuple[str, str], ...]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


# html-manager 1.x is the embed manager of ipywidgets 8 (controls 2.0.0 / base 2.0.0
# model versions); 1.0.15 is the release that ships with ipywidgets 8.1.9, pinned in
# requirements.txt. Bump them together.
ASSETS: tuple[Asset, ...] = (
    Asset(
        name="requirejs",
        version="2.3.8",
        integrity="sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
        files=(("require.js", "_widgets/require.js"),),
    ),
    Asset(
        name="@jupyter-widgets/html-manager",
        version="1.0.15",
        integrity="sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        # embed-amd.js plus the font files its bundled CSS refers to, found next to it.
        files=(("dist", "_widgets/html-manager"),),
    ),
    Asset(
        name="mathjax",
        version="3.2.2",
        integrity="sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        # tex-chtml.js loads its TeX extensions, fonts, menu and accessibility parts on
        # demand, relative to its own URL.
        files=(
            ("es5/tex-chtml.js", "_mathjax/tex-chtml.js"),
            ("es5/input", "_mathjax/input"),
            ("es5/output", "_mathjax/output"),
            ("es5/ui", "_mathjax/ui"),
            ("es5/a11y", "_mathjax/a11y"),
            ("es5/sre", "_mathjax/sre"),
            ("es5/adaptors", "_mathjax/adaptors"),
            ("LICENSE", "_mathjax/LICENSE"),
        ),
    ),
)

# Files of this repository copied next to the fetched ones, on every run.
LOCAL_FILES: tuple[tuple[str, str], ...] = (
    ("scripts/web/widgets-setup.js", "_widgets/widgets-setup.js"),
)

# Source maps and the non-AMD bundle are never loaded by the book.
IGNORE = shutil.ignore_patterns("*.map", "embed.js", "embed.js.LICENSE.txt", "libembed-amd.js")


def manifest() -> str:
    """What a finished fetch looks like; a different pin means fetch again."""
    return json.dumps([[a.spec, a.integrity, list(a.files)] for a in ASSETS], indent=1)


def sri(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def npm_pack(asset: Asset, workdir: Path) -> Path:
    """Download one package tarball with `npm pack` and check it against its pin."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("fetch_web_assets: npm is not on PATH; install Node.js and npm first.")
    out = subprocess.run(
        [npm, "pack", "--json", "--ignore-scripts", "--pack-destination", str(workdir), asset.spec],
        check=True,
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    filename = json.loads(out.stdout)[0]["filename"]
    tarball = workdir / filename
    got = sri(tarball)
    if got != asset.integrity:
        sys.exit(
            f"fetch_web_assets: {asset.spec} integrity mismatch: expected {asset.integrity}, "
            f"got {got}"
        )
    return tarball


def unpack(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    return into / "package"


def copy_local_files(dest: Path) -> None:
    for src_rel, dst_rel in LOCAL_FILES:
        dst = dest / dst_rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / src_rel, dst)


def fetch(dest: Path) -> None:
    # The stamp sits beside the folder, not in it, so it is not copied into the book.
    stamp = dest.with_name(dest.name + ".assets.json")
    if stamp.is_file() and stamp.read_text() == manifest() and dest.is_dir():
        copy_local_files(dest)
        print(f"fetch_web_assets: {dest} is up to date")
        return
    with tempfile.TemporaryDirectory(prefix="deliverylab-web-") as tmp:
        staging = Path(tmp) / "web"
        for asset in ASSETS:
            workdir = Path(tmp) / asset.name.replace("/", "__")
            workdir.mkdir()
            package = unpack(npm_pack(asset, workdir), workdir)
            for src_rel, dst_rel in asset.files:
                src, dst = package / src_rel, staging / dst_rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, ignore=IGNORE)
                else:
                    shutil.copy2(src, dst)
            print(f"fetch_web_assets: {asset.spec} ok")
        copy_local_files(staging)
        stamp.unlink(missing_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
        stamp.write_text(manifest())
    print(f"fetch_web_assets: assets in {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "build" / "web")
    args = parser.parse_args(argv)
    fetch(args.dest)


if __name__ == "__main__":
    main()

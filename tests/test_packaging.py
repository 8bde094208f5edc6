"""
The wheel ships the Twisted plugin the right way, and ``twistd`` finds it.

Nothing here touches the network: the wheel is built without build
isolation, and installed without dependencies into a fresh virtualenv that
borrows the running environment's packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Modules the plugin file must not import: plugin scans import every
#: plugin module, so each must be cheap and unable to fail.
HEAVY_MODULES = (
    "nattraverse.stun.server",
    "nattraverse.tap",
    "twisted.internet.reactor",
    "cryptography",
)

_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "_build",
    "_trial_temp",
)


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source, with a stray dropin.cache in it."""
    source = tmp_path_factory.mktemp("source") / "nattraverse"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    # Twisted writes this cache next to plugin files; it must never ship.
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    out = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--wheel-dir",
        out,
        source,
    )
    (built,) = out.glob("nattraverse-*.whl")
    return built


def _mirror(source: Path, target: Path, skip: Callable[[str], bool]) -> None:
    """Fill *target* with symlinks to the entries of *source* but those *skip* names."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if not skip(entry.name) and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)


def _ours(name: str) -> bool:
    # Also catches nattraverse's dist-info and editable-install hooks.
    return "nattraverse" in name or name in ("__pycache__", "dropin.cache")


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    The Python of a fresh virtualenv with the wheel installed.

    Its dependencies are symlinked from the running environment.  A venv
    made with ``--system-site-packages`` would not do: from inside a venv it
    sees the base interpreter's packages, not this venv's; and plain
    sharing would let this environment's own copy of nattraverse (and of
    its plugin file, which a regular install puts inside Twisted's
    ``twisted/plugins``) stand in for the wheel's.
    """
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False, symlinks=True)
    python = home / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    for key in ("purelib", "platlib"):
        outer = Path(sysconfig.get_paths()[key])
        _mirror(outer, site, skip=lambda name: _ours(name) or name == "twisted")
        if (outer / "twisted").is_dir():
            _mirror(
                outer / "twisted",
                site / "twisted",
                skip=lambda name: name in ("plugins", "__pycache__"),
            )
            _mirror(outer / "twisted" / "plugins", site / "twisted" / "plugins", skip=_ours)
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    return python


def test_wheel_contents(wheel: Path) -> None:
    """The wheel ships the plugin file and py.typed, and nothing of Twisted's own."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    plugins = [n for n in names if n.startswith("twisted/plugins/nattraverse_")]
    assert plugins, names
    assert all(n.endswith(".py") for n in plugins), plugins
    assert "nattraverse/py.typed" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]


def test_twistd_lists_natrendezvous(installed: Path) -> None:
    """``twistd --help`` in the fresh virtualenv offers the natrendezvous command."""
    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    output = _run(installed, "-c", twistd, "--help", cwd=installed.parent)
    assert "natrendezvous" in output.split(), output


def test_plugin_module_is_cheap(installed: Path) -> None:
    """Importing the plugin module imports neither the server, the tap, a reactor nor crypto."""
    probe = (
        "import json, sys\n"
        "import twisted.plugins.nattraverse_rendezvous as plugin\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "import nattraverse\n"
        "print(json.dumps([plugin.__file__, nattraverse.__file__, heavy]))\n"
    )
    plugin_file, package_file, heavy = json.loads(
        _run(installed, "-c", probe, cwd=installed.parent)
    )
    home = str(installed.parent.parent)
    assert plugin_file.startswith(home), plugin_file
    assert package_file.startswith(home), package_file
    assert heavy == []

"""The package as a user installs it: a wheel built from this tree carries every file of ``src/ibkit``
(the demo's YAML configs included), and ``ibkit demo`` finds its configs inside the installed copy.

The wheel is built from a copy of the tree (the build writes ``build/`` and ``*.egg-info`` where it
runs) with the build backend pyproject.toml names, then installed with ``--no-deps --target`` into a
temporary folder: the dependencies (torch, ...) come from this interpreter's environment, while
``PYTHONPATH`` puts the installed ``ibkit`` ahead of the editable checkout. The child runs outside the
repository, so the source tree cannot be what it imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "ibkit"

# One child process (imports are the slow part): where ibkit and the demo's configs are, then exactly what
# ``python -m ibkit demo --help`` runs.
CHECK = """
import json, runpy, sys
from pathlib import Path
import ibkit, ibkit.shapes.pipeline as pipeline
Path(sys.argv[1]).write_text(json.dumps({
    "ibkit": ibkit.__file__, "configs": str(pipeline.CONFIGS),
    "yaml": sorted(str(p.relative_to(pipeline.CONFIGS)) for p in pipeline.CONFIGS.rglob("*.yaml"))}))
sys.argv = ["ibkit", "demo", "--help"]
try:
    runpy.run_module("ibkit", run_name="__main__", alter_sys=True)
except SystemExit as done:
    sys.exit(done.code)
"""


def _package_files(root: Path) -> set[str]:
    """Every file of the package below ``root`` except bytecode."""
    return {
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_an_installed_wheel_ships_the_demo_configs(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", *[p.name for p in REPO.glob("LICEN[CS]E*")]):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(PACKAGE, tree / "src" / "ibkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)], tree, env)
    (wheel,) = dist.glob("ibkit-*.whl")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
         tmp_path, env)

    installed = site / "ibkit"
    missing = _package_files(PACKAGE) - _package_files(installed)
    assert not missing, f"the wheel leaves out {sorted(missing)} (pyproject.toml's package data)"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env["PYTHONPATH"] = str(site)
    report = tmp_path / "found.json"
    shown = _run([sys.executable, "-c", CHECK, str(report)], outside, env).stdout
    found = json.loads(report.read_text())
    assert Path(found["ibkit"]).resolve().is_relative_to(site.resolve()), found["ibkit"]
    configs = Path(found["configs"])
    assert configs.resolve().is_relative_to(installed.resolve()) and configs.is_dir(), configs
    expected = sorted(str(p.relative_to(PACKAGE / "shapes" / "configs"))
                      for p in (PACKAGE / "shapes" / "configs").rglob("*.yaml"))
    assert expected and found["yaml"] == expected
    assert "--output_dir" in shown  # the demo's help, from the installed copy

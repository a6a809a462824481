"""The Vagrantfile is valid for Vagrant (Debian's `vagrant` package; scripts/test installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_vagrant_validate(tmp_path: Path) -> None:
    if not shutil.which("vagrant"):
        if os.environ.get("CI"):
            pytest.fail("vagrant is not installed: scripts/setup --vagrant should have installed it")
        pytest.skip("vagrant is not installed (sudo scripts/setup --vagrant)")
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_HOME": str(tmp_path / "home")}
    r = subprocess.run(["vagrant", "validate"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_vagrantfile_forwards_nothing() -> None:
    text = (REPO / "Vagrantfile").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "forwarded_port" not in code and "public_network" not in code and "private_network" not in code
    assert "scripts/setup" in code

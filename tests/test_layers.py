"""The package's layering (pyproject.toml's import-linter contracts) holds, and the contracts
can fail: an upward import planted in a copy of the package breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_layering_contracts_hold() -> None:
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("core/events.py", "import lightning_dp.lightning.budget", "Layers"),
        ("mechanism/gaussian.py", "import lightning", "never import Lightning"),
        ("lightning/private_step.py", "import lightning_dp.lightning.budget", "StepGuard"),
        ("mechanism/grads/hooks.py", "from lightning_dp.mechanism.grads import selection", "how they are chosen"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path: Path, module: str, planted: str, broken: str) -> None:
    shutil.copytree(ROOT / "lightning_dp", tmp_path / "lightning_dp", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "lightning_dp" / module
    path.write_text(path.read_text() + f"\n{planted}  # noqa\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert broken in proc.stdout.split("Broken contracts")[-1]

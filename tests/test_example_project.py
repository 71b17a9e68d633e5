"""`make demo` stays working: the example project's own end-to-end run, as a test.

It runs once, in the SQLite pass, on the defaults a new user gets (SQLite, kombu's
filesystem broker, a real worker), with its state in a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import on_postgres

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_and_checks_its_own_claims(tmp_path: Path) -> None:
    if on_postgres():
        pytest.skip("the demo runs once, in the SQLite pass")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "BROKER", "DATABASE_URL")
    }
    env["DEMO_STATE_DIR"] = str(tmp_path / "demo")
    result = subprocess.run(
        [sys.executable, str(ROOT / "example_project" / "manage.py"), "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "OK: all of the above checked; no worker process left behind." in output
    assert "dave's registration rolled back" in output

"""``receiver`` without ``defer=True`` is a drop-in for ``django.dispatch.receiver``.

Proof: Django's own ``tests/dispatch`` and ``tests/signals`` suites, for the installed Django
version, pass with ``django.dispatch.receiver`` swapped for ``deferred_signals.receiver``
(``tests/django_suite/run.py`` does the swap and checks it happened). Django's test suite is
not in its wheel, so the source distribution is downloaded from PyPI once and cached in the
virtualenv (``<venv>/django-tests/<version>/``); later runs are offline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NoReturn

import django
import pytest
from django.conf import settings

import deferred_signals

RUNNER = Path(__file__).parent / "django_suite" / "run.py"
LABELS = ("dispatch", "signals")
#: Django 5.2 has 41 tests in these two suites; fewer than this means they did not all run.
MIN_TESTS = 35
SWAP_OK = "deferred_signals: swap checked:"


class Unavailable(Exception):
    """Django's test suite could not be fetched."""


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI is set: this check must run, not skip)", pytrace=False)
    pytest.skip(reason)


def django_tests_dir() -> Path:
    """Django's ``tests/`` directory for the installed version, fetched once and cached."""
    version = django.get_version()
    cache = Path(sys.prefix) / "django-tests" / version
    tests_dir = cache / "tests"
    if (tests_dir / "runtests.py").is_file():
        return tests_dir
    sdist = _download_sdist(version, cache)
    with tempfile.TemporaryDirectory(dir=cache) as scratch, tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"]]
        if not members:
            raise Unavailable(f"{sdist.name} has no tests/ directory")
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(scratch, members=members, **extra)  # type: ignore[arg-type]
        top = members[0].name.split("/")[0]
        # A rename, so a concurrent or interrupted run never sees half a directory.
        try:
            os.rename(Path(scratch, top, "tests"), tests_dir)
        except OSError:
            if not (tests_dir / "runtests.py").is_file():
                raise
    return tests_dir


def _download_sdist(version: str, cache: Path) -> Path:
    found = sorted(cache.glob("[Dd]jango-*.tar.gz"))
    if found:
        return found[0]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        pip = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", f"django=={version}",
                "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
                "--retries", "1", "--timeout", "20", "--dest", str(cache),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"pip download django=={version} failed: {error}") from error
    found = sorted(cache.glob("[Dd]jango-*.tar.gz"))
    if pip.returncode or not found:
        tail = "\n".join((pip.stdout + pip.stderr).strip().splitlines()[-5:])
        raise Unavailable(f"cannot download Django {version}'s source distribution:\n{tail}")
    return found[0]


def test_django_signal_suites_pass_with_our_receiver(tmp_path: Path) -> None:
    if "postgresql" in settings.DATABASES["default"]["ENGINE"]:
        pytest.skip("Django's suites use their own SQLite settings: they run in the SQLite pass")
    try:
        tests_dir = django_tests_dir()
    except Unavailable as error:
        unavailable(f"Django's own test suite is not available: {error}")
    # The subprocess must test this checkout, and use Django's test settings, not ours.
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    source = str(Path(deferred_signals.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable, str(RUNNER), str(tests_dir),
            "--settings=test_sqlite", "--parallel=1", "--noinput", *LABELS,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, output
    assert f"{SWAP_OK} " in result.stdout, output
    assert f"from {deferred_signals.__file__}" in result.stdout, output
    ran = re.search(r"^Ran (\d+) tests? in ", output, re.MULTILINE)
    assert ran, output
    assert int(ran.group(1)) >= MIN_TESTS, output
    assert re.search(r"^OK\b", output, re.MULTILINE), output

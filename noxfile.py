"""The version matrix: `make matrix` (or `nox`) runs the suite per supported Python/Django.

Each session skips a Python this machine does not have; pyenv's versions are found even when
pyenv's shims would refuse them.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True

MATRIX = [
    # (python, Django, Celery)
    ("3.10", "5.2", "5.5"),  # oldest supported everything: kombu without batched publishing
    ("3.11", "5.2", "5.7"),
    ("3.12", "6.0", "5.7"),
    ("3.13", "6.1", "5.7"),
]


def interpreter(version: str) -> str:
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    return str(found[-1]) if found else version


@nox.session
@nox.parametrize(
    ("python", "django", "celery"),
    [
        nox.param(interpreter(py), dj, ce, id=f"py{py}-django{dj}-celery{ce}")
        for py, dj, ce in MATRIX
    ],
)
def tests(session: nox.Session, django: str, celery: str) -> None:
    session.install("-e", ".[test]", f"django~={django}.0", f"celery[redis]~={celery}.0")
    warnings = ["-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning"]
    session.run("python", *warnings, "-m", "pytest", "-q", "--ds=tests.settings", *session.posargs)
    session.run(
        "python", *warnings, "-m", "pytest", "-q", "--ds=tests.settings_postgres", *session.posargs
    )

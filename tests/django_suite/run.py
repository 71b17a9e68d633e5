"""Run Django's own test suite with ``django.dispatch.receiver`` swapped for ours.

    python tests/django_suite/run.py DJANGO_TESTS_DIR [runtests.py arguments...]

``DJANGO_TESTS_DIR`` is the ``tests/`` directory of Django's source distribution, for the
installed Django version. The swap happens before ``runtests.py`` imports anything, so every
test module that does ``from django.dispatch import receiver`` gets ``deferred_signals.receiver``.
After the run, the script checks that the modules using ``receiver`` really held ours, so the
check cannot pass vacuously; it exits non-zero if the suite failed or the swap did not happen.
Run it with ``--parallel=1``: worker processes started by spawn or forkserver would not inherit
the swap.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import django.dispatch
import django.dispatch.dispatcher

# Imported before the swap: the package itself delegates to Django's original ``receiver``.
import deferred_signals

ORIGINAL = django.dispatch.dispatcher.receiver
#: Every public name under which Django exports ``receiver``.
EXPORTERS = (django.dispatch, django.dispatch.dispatcher)
#: The test modules of Django's suites that use ``receiver`` (as a decorator).
USERS = ("dispatch.tests", "signals.tests")
SWAP_OK = "deferred_signals: swap checked:"


def swap() -> None:
    for module in EXPORTERS:
        module.receiver = deferred_signals.receiver  # type: ignore[attr-defined]


def swap_problems(tests_dir: Path) -> list[str]:
    problems = []
    for name in USERS:
        module = sys.modules.get(name)
        if module is None:
            problems.append(f"{name} was never imported: did the suite run?")
        elif module.receiver is not deferred_signals.receiver:
            problems.append(f"{name}.receiver is {module.receiver!r}, not ours")
    # Django's own modules imported before the swap keep the original; test modules must not.
    problems += [
        f"{name}.receiver is still Django's original"
        for name, module in list(sys.modules.items())
        if name not in USERS
        and getattr(module, "receiver", None) is ORIGINAL
        and Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(tests_dir)
    ]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    tests_dir = Path(argv[1]).resolve()
    runtests = tests_dir / "runtests.py"
    swap()
    # As if run as ``python runtests.py ...``: its directory first on sys.path, not ours.
    sys.path[0] = str(tests_dir)
    sys.argv = [str(runtests), *argv[2:]]
    status: int = 0
    try:
        runpy.run_path(str(runtests), run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    sys.stdout.flush()
    problems = swap_problems(tests_dir)
    if problems:
        print("deferred_signals: the swap did not happen:", *problems, sep="\n  ")
        return status or 1
    print(
        f"{SWAP_OK} {', '.join(USERS)} used deferred_signals.receiver "
        f"from {deferred_signals.__file__}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Case 6: one transaction of 100,000 saves, one deferred handler each, in a process of its own.

Each variant runs in a fresh child process (``python -m benchmarks.memory VARIANT N``): it
warms up, reads its RSS, saves N rows in one transaction, reads its RSS again just before
the commit (what the process holds for the commit), then commits and reports the peak RSS
(``ru_maxrss``) and how long the commit took (publishing included). Figures are above the
same loop with no receiver, the floor. ``PUBLISH_TIMEOUT`` is raised to 600 s here: the
case measures publishing every call (the idiom has no bound), where the default 2 s would
spill most of a 100,000-call commit to the outbox. Long: selected with ``--cases memory``;
``DS_BENCH_MEMORY_SAVES`` sets N (default 100,000).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from benchmarks.stats import table

if TYPE_CHECKING:  # not at import: the child process sets Django up first
    from benchmarks.run import Plan
    from benchmarks.runner import Runner

SAVES = int(os.environ.get("DS_BENCH_MEMORY_SAVES", "100000"))
VARIANTS = {
    "none": "no receiver (floor)",
    "deferred": "deferred_signals",
    "idiom": "on_commit(lambda: task.delay())",
}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant: str, saves: int) -> dict[str, Any]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import transaction
    from django.db.models.signals import post_save
    from django.test import override_settings

    from benchmarks import cases, celery_app
    from benchmarks.benchapp import handlers
    from benchmarks.benchapp.models import Item

    del celery_app
    installers: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "none": nullcontext,
        "deferred": lambda: cases.deferred(
            post_save, [handlers.saved_deferred], ["bench.saved"], Item
        ),
        "idiom": lambda: cases.plain(post_save, handlers.saved_idiom, Item),
    }
    install = installers[variant]
    override_settings(
        DEFERRED_SIGNALS={**settings.DEFERRED_SIGNALS, "PUBLISH_TIMEOUT": 600}
    ).enable()
    with install():
        with transaction.atomic():  # warm: connections, producer, queue declaration
            for _ in range(10):
                Item.objects.create(name="warm", quantity=0, price=cases.PRICE)
        before = _rss()
        atomic = transaction.atomic()
        atomic.__enter__()
        for n in range(saves):
            Item.objects.create(name="m", quantity=n, price=cases.PRICE)
        held = _rss() - before
        start = time.perf_counter()
        atomic.__exit__(None, None, None)
        commit = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"held": held, "peak": peak, "commit": commit}


def memory_case(runner: Runner, plan: Plan) -> None:
    from benchmarks import summary

    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        if variant != "none" and not runner.broker_up:
            continue
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", variant, str(SAVES)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode:
            runner.problems.append(f"memory {variant}: {done.stderr[-500:]}")
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        if runner.queue is not None:
            expected = 0 if variant == "none" else SAVES + 10
            found = runner.queue.purge()
            if found != expected:
                runner.problems.append(f"memory {variant}: {found} messages, {expected} expected")
    floor = results.get("none")
    if floor is None:
        return
    rows = []
    for variant, result in results.items():
        rows.append(
            [
                VARIANTS[variant],
                f"{(result['held'] - floor['held']) / 2**20:+.1f}",
                f"{(result['peak'] - floor['peak']) / 2**20:+.1f}",
                f"{result['commit']:.2f}",
            ]
        )
    print(
        f"One transaction of {SAVES:,} `Item.objects.create()`, one post_save handler each, "
        "each variant in a fresh process. MiB above the floor's same loop.\n"
    )
    print(table(["variant", "held at commit MiB", "peak RSS MiB", "commit s"], rows))
    if "deferred" in results and "idiom" in results:
        ours, idiom = results["deferred"], results["idiom"]
        ours_extra = ours["peak"] - floor["peak"]
        idiom_extra = idiom["peak"] - floor["peak"]
        summary.add_target(
            "10.6 100,000 saves, peak RSS above floor: ours / idiom",
            ours_extra / idiom_extra if idiom_extra > 0 else float("nan"),
            1.0,
        )
        summary.add_target(
            "10.6 100,000 saves, commit time: ours / idiom", ours["commit"] / idiom["commit"], 0.5
        )


CASES: list[tuple[str, Callable[[Runner, Plan], None]]] = [
    ("memory. One transaction of 100,000 saves: memory held and commit time", memory_case),
]

if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))

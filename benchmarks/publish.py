"""Case 5: the publish step alone, ``apply_async`` against the lean message builder.

1,000 committed calls published to Redis through one producer inside ``Producer.batch``,
as deferred_signals' flush does, once per call with ``Task.apply_async`` (today), once
with ``MessageBuilder`` + ``publish_message`` through kombu, and once as the request path
does on Redis, ``MessageBuilder`` + ``RedisPush``. The other rows split what remains: building
alone, kombu's publish of messages built beforehand (JSON + kombu + Redis), the JSON alone,
and a raw pipelined LPUSH of the same bytes (the broker floor).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import current_app
from kombu.utils import json as kombu_json
from kombu.utils.uuid import uuid

from benchmarks import cases, settings
from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.cases import Variant
from benchmarks.runner import Runner
from benchmarks.services import redis_client
from benchmarks.stats import table, us
from deferred_signals import registry
from deferred_signals.codec import Encoder
from deferred_signals.messages import Message, MessageBuilder, summary
from deferred_signals.producer import publish_message
from deferred_signals.redispush import RedisPush

if TYPE_CHECKING:
    from benchmarks.run import Plan

CALLS = 1000
#: dispatch.BATCH_SIZE: messages kombu buffers before one pipelined write.
BATCH_SIZE = 100
HANDLER = "bench.publish"


@dataclass
class State:
    """What the variant being measured publishes: set by its ``install()``."""

    mode: str = ""
    task: Any = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    built: list[Message] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)


STATE = State()


def _install(mode: str) -> Callable[[], AbstractContextManager[None]]:
    @contextmanager
    def install() -> Iterator[None]:
        with cases.deferred(handlers.order_placed, [handlers.order_deferred], [HANDLER]):
            handler = registry.get(HANDLER)
            assert handler is not None
            STATE.mode, STATE.task = mode, handler.task
            if mode in ("kombu", "json", "redis"):
                builder = MessageBuilder(current_app)
                STATE.built = [
                    _build(builder, body, {"queue": settings.QUEUE}) for body in STATE.bodies
                ]
                STATE.raw = [_envelope(message) for message in STATE.built]
            yield

    return install


def _build(builder: MessageBuilder, body: dict[str, Any], options: dict[str, Any]) -> Message:
    message = builder.build(STATE.task, uuid(), body, options)
    assert message is not None, "the builder took the per-call path"
    return message


def _envelope(message: Message) -> bytes:
    """The JSON kombu's Redis transport stores for ``message`` (what LPUSH sends)."""
    return kombu_json.dumps(
        {
            "body": base64.b64encode(kombu_json.dumps(message.body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers,
            "properties": {**message.properties, "delivery_tag": uuid()},
        }
    ).encode()


VARIANTS = [
    Variant("apply_async", "Task.apply_async per call (today)", True, CALLS, _install("apply")),
    Variant("builder", "MessageBuilder + publish_message", True, CALLS, _install("builder")),
    Variant("push", "MessageBuilder + RedisPush (the request path)", True, CALLS, _install("push")),
    Variant("build", "  building only, nothing sent", False, 0, _install("build")),
    Variant("kombu", "  Producer.publish of built messages", True, CALLS, _install("kombu")),
    Variant("json", "  JSON only: body + envelope dumps", False, 0, _install("json")),
    Variant("redis", "  raw Redis: pipelined LPUSH, same bytes", True, CALLS, _install("redis")),
]


def publish_all() -> float:
    """Publish (or build) ``CALLS`` messages the way the current variant does; seconds."""
    mode, task, options = STATE.mode, STATE.task, {"queue": settings.QUEUE}
    start = time.perf_counter()
    if mode == "apply":
        with current_app.producer_or_acquire() as producer, producer.batch(max_size=BATCH_SIZE):
            for body in STATE.bodies:
                task.apply_async(
                    kwargs=body,
                    task_id=uuid(),
                    producer=producer,
                    argsrepr="()",
                    kwargsrepr=summary(body),
                    **options,
                )
    elif mode == "builder":
        builder = MessageBuilder(current_app)
        with current_app.producer_or_acquire() as producer, producer.batch(max_size=BATCH_SIZE):
            for body in STATE.bodies:
                publish_message(producer, _build(builder, body, options))
    elif mode == "push":
        builder = MessageBuilder(current_app)
        with current_app.producer_or_acquire() as producer:
            push = RedisPush.of(producer)
            assert push is not None, "not a Redis channel"
            for at in range(0, len(STATE.bodies), BATCH_SIZE):
                for body in STATE.bodies[at : at + BATCH_SIZE]:
                    publish_message(producer, _build(builder, body, options), push=push)
                push.flush()
            assert not push.pending
    elif mode == "build":
        builder = MessageBuilder(current_app)
        for body in STATE.bodies:
            _build(builder, body, options)
    elif mode == "kombu":
        with current_app.producer_or_acquire() as producer, producer.batch(max_size=BATCH_SIZE):
            for message in STATE.built:
                kwargs = message.publish_kwargs()
                kwargs["declare"] = None
                producer.publish(message.body, **kwargs)
    elif mode == "json":
        for message in STATE.built:
            _envelope(message)
    elif mode == "redis":
        client = _redis()
        for start_at in range(0, len(STATE.raw), BATCH_SIZE):
            pipe = client.pipeline(transaction=False)
            for raw in STATE.raw[start_at : start_at + BATCH_SIZE]:
                pipe.lpush(settings.QUEUE, raw)
            pipe.execute()
    return time.perf_counter() - start


_client: Any = None


def _redis() -> Any:
    global _client
    if _client is None:
        _client = redis_client()
    return _client


def _bodies(items: list[Item]) -> list[dict[str, Any]]:
    """Message bodies as the proxy encodes them: the ``order_placed`` calls of case 2."""
    encoder = Encoder(fresh=True, fields=False)
    return [
        {
            "v": 1,
            "signal": 0,
            "sender": encoder.encode(Item),
            "kwargs": {
                "instance": encoder.encode(item),
                "amount": encoder.encode(item.price),
                "tags": encoder.encode(cases.TAGS),
                "placed_at": encoder.encode(cases.PLACED_AT),
            },
        }
        for item in items
    ]


def case5(runner: Runner, plan: Plan) -> None:
    items = list(Item.objects.order_by("pk")[:CALLS])
    if len(items) < CALLS:
        Item.objects.bulk_create(
            Item(name=f"item {n}", quantity=n, price=cases.PRICE) for n in range(CALLS)
        )
        items = list(Item.objects.order_by("pk")[:CALLS])
    STATE.bodies = _bodies(items)
    results = runner.measure(
        "case 5",
        VARIANTS,
        publish_all,
        rounds=plan.case5.rounds,
        per_round=plan.case5.per_round,
        warmup=plan.case5.warmup,
        quiet_gc=False,
    )
    found = {m.variant.key: m for m in results if not m.skipped}
    reference = found.get("apply_async")
    rows = []
    for measured in results:
        if measured.skipped:
            rows.append([measured.variant.label, measured.skipped, "", ""])
            continue
        samples = measured.samples
        ratio = str(samples.ratio_to(reference.samples)) if reference else "-"
        rows.append(
            [measured.variant.label, us(samples.median / CALLS), us(samples.p95 / CALLS), ratio]
        )
    print(
        f"Each sample: {CALLS:,} `order_placed` calls published to Redis through one producer "
        f"in `Producer.batch(max_size={BATCH_SIZE})`, producer acquisition included; "
        f"{plan.case5.rounds} rounds of {plan.case5.per_round} per variant.\n"
    )
    print(table(["variant", "median us/msg", "p95 us/msg", "x apply_async"], rows))
    if reference and "builder" in found:
        ratio = found["builder"].samples.ratio_to(reference.samples)
        print(f"\n> MessageBuilder + publish_message / apply_async, 1,000 messages: {ratio}")
    if reference and "push" in found:
        ratio = found["push"].samples.ratio_to(reference.samples)
        print(f"> MessageBuilder + RedisPush / apply_async, 1,000 messages: {ratio}")

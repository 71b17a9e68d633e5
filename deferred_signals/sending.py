"""One publish attempt of a batch over one producer, and how far the broker confirmed it.

:class:`Attempt` sends the calls of a batch in order: chunks of :data:`BATCH_SIZE` written
in one round trip where the transport pipelines (Redis), confirmed once per batch on AMQP
(publisher confirms, returned messages as refusals). It counts the confirmed prefix
(``done``), and the calls the broker took all the same after a refusal
(:data:`PUBLISHED_AFTER`). :class:`Sender` turns one call into its message (built once per
handler route, else ``apply_async``) and hands it to the producer (:mod:`producer`).
:mod:`publisher` decides on retries, the deadline and the cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from itertools import islice
from typing import TYPE_CHECKING, Any

from celery import signals as celery_signals

from . import broker, propagation, sentry
from .conf import conf
from .exceptions import PublishRefused, PublishTimeout
from .messages import MessageBuilder, summary
from .producer import publish_fallback, publish_message
from .redispush import RedisPush, dumps_tree

if TYPE_CHECKING:
    from .dispatch import PendingCall

#: Messages pipelined per round trip on transports that batch (Redis): 100 keeps a big
#: transaction's peak memory low for 10 round trips per 1,000 calls instead of 1.
BATCH_SIZE = 100
#: Write Redis messages with :class:`RedisPush` (False: through ``Producer.publish``, for
#: the benchmark's side-by-side comparison).
FAST_REDIS = True


class Attempt:
    """One publish attempt's calls, and how many of them the broker has confirmed so far."""

    def __init__(self, calls: Sequence[PendingCall], deadline: float) -> None:
        self.calls = calls
        self.deadline = deadline
        self.done = 0
        # _refuse_returned: how many of Confirms.returned it has seen, and where each call
        # of the attempt in hand stands.
        self.returns_seen = 0
        self.positions: dict[str, int] | None = None
        #: Calls after ``done`` that Redis took: the push wrote them, then kombu's pipeline
        #: of their chunk failed. Not sent again by a retry; named in the error's
        #: ``published_after``.
        self.written: set[str] = set()

    def remaining(self, answering: bool = False) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PublishTimeout(
                f"PUBLISH_TIMEOUT ({conf.publish_timeout} s) ran out", broker_answering=answering
            )
        return remaining

    def send(self, app: Any, producer: Any) -> None:
        channel = producer.channel
        publish = Sender.of(app, producer)
        if getattr(channel, "confirm_select", None) is not None:
            self._send_confirmed(producer, publish, broker.Confirms.of(channel))
            return
        size = 1
        if len(self.calls) - self.done > 1:  # a single call is a chunk of one anyway
            # Redis pipelines a chunk and confirms it with its replies; a transport that
            # does neither (filesystem, memory) has written each message when publish()
            # returns.
            pipelines = bool(getattr(channel, "create_publish_batch", None)) and getattr(
                channel, "supports_batch_publish", True
            )
            size = BATCH_SIZE if pipelines else 1
        push = publish.push
        while self.done < len(self.calls):
            remaining = self.remaining(answering=self.done > 0)
            broker.bound_sockets(producer, remaining)
            chunk = self.calls[self.done : self.done + size]
            written = self.written
            pushed: list[str] = []
            try:
                # What the push refuses goes through kombu's own batch, written as the
                # block exits, after the push wrote the rest.
                with producer.batch(max_size=len(chunk)) if len(chunk) > 1 else nullcontext():
                    for call in chunk:
                        if written and call.id in written:
                            continue  # taken by Redis in an attempt before this one
                        try:
                            publish(call, remaining)
                        except Exception as error:
                            blame(error, call)
                            raise
                    if push is not None:
                        ids = list(push.ids)
                        try:
                            push.flush(remaining)
                        except PublishRefused as refused:
                            if refused.refused_call is not None:  # a list of another type
                                setattr(refused, FAILED_CALL, refused.refused_call)
                            raise
                        pushed = ids
            except Exception:
                written.update(pushed)
                raise
            self.done += len(chunk)

    def _send_confirmed(self, producer: Any, publish: Sender, confirms: broker.Confirms) -> None:
        """AMQP: publish everything, then wait for the broker's acks (one wait, not one each)."""
        first, base = confirms.next_tag, self.done
        self.returns_seen, self.positions = 0, None
        try:
            broker.bound_sockets(producer, self.remaining())
            for call in self.calls[self.done :]:
                try:
                    publish(call, self.remaining())
                except Exception as error:
                    blame(error, call)
                    raise
                confirms.next_tag += 1
            last = confirms.next_tag - 1
            while True:
                if confirms.returned:
                    self._refuse_returned(confirms, base, first)
                acked = confirms.acked_up_to(last)
                self.done = base + max(0, acked - first + 1)
                if acked >= last:
                    return
                # Confirms may arrive out of order: after a nack, wait for the tags before it.
                if confirms.nacked is not None and acked >= confirms.nacked - 1:
                    call = self.calls[base + confirms.nacked - first]
                    returned = confirms.returned.get(call.id)
                    refused = PublishRefused(
                        f"the broker refused message {confirms.nacked - first + 1} of the batch"
                        + (f": returned, no queue took it: {returned}" if returned else "")
                    )
                    after = confirms.nacked + 1
                    answered = self._note_acked_after(
                        refused, producer, confirms, base, first, after, last
                    )
                    if answered:
                        # Else the broker stopped answering: not blamed, the unanswered calls
                        # are spilled with it, not tried again (a second PUBLISH_TIMEOUT).
                        blame(refused, call)
                    raise refused
                producer.connection.drain_events(timeout=self.remaining(answering=acked >= first))
        except Exception as error:
            # What the broker confirmed before it failed still counts: a channel error comes
            # after the acks of the messages the channel took before it.
            if confirms.returned:
                self._refuse_returned(confirms, base, first)
            self.done = base + max(0, confirms.acked_up_to(confirms.next_tag - 1) - first + 1)
            if (
                broker.is_refusal(error)
                and not isinstance(error, PublishRefused)
                and not broker.refuses_operation_in_hand(error)
            ):
                # A message refused after its publish (a missing exchange, one too large):
                # the channel closed without saying which, and the error surfaced at a later
                # call's publish or at the wait. No call can be blamed.
                with suppress(AttributeError):
                    delattr(error, FAILED_CALL)
            raise

    def _note_acked_after(
        self,
        refused: PublishRefused,
        producer: Any,
        confirms: broker.Confirms,
        base: int,
        first: int,
        after: int,
        last: int,
    ) -> bool:
        """Set on ``refused`` the ids of the calls of tags ``after`` to ``last`` (those after
        the refused one) that the broker took (other queues than a full one): they are
        published, and must not be sent again. Waits for their confirms within
        PUBLISH_TIMEOUT; one still unanswered then counts as not published (sent again: at
        least once). Returns whether the broker answered them all."""
        answered, waiting = True, after
        try:
            # From the first tag not answered on: to a deleted queue each message is returned
            # in a frame of its own, and a scan from ``after`` per frame is quadratic.
            while (waiting := confirms.unanswered(waiting, last)) <= last:
                producer.connection.drain_events(timeout=self.remaining(answering=True))
                if confirms.returned:
                    self._refuse_returned(confirms, base, first)
        except Exception as error:
            if not broker.is_broker_failure(error):
                raise
            answered = False
        refused.published_after = frozenset(
            self.calls[base + tag - first].id for tag in confirms.acked_between(after, last)
        )
        return answered

    def _refuse_returned(self, confirms: broker.Confirms, base: int, first: int) -> None:
        """A message returned as unroutable is acked next, yet no queue has it: a refusal.
        (RabbitMQ sends the return before the ack, so this runs before that ack counts.)
        Each return once, found by id: to a deleted queue, every message of a batch is
        returned, and a scan of the batch per return is quadratic."""
        if self.positions is None:
            self.positions = {call.id: n for n, call in enumerate(self.calls[base:])}
        for task_id in islice(confirms.returned, self.returns_seen, None):
            n = self.positions.get(task_id)
            if n is not None:
                confirms.on_nack(first + n, multiple=False)
        self.returns_seen = len(confirms.returned)


#: The ids of calls after the confirmed prefix that the broker took all the same: a
#: PublishRefused's field, set on another error too when Redis took part of a chunk.
PUBLISHED_AFTER = "published_after"

#: Set on an exception raised while one call's message was built or handed to the producer
#: (not while a batch was written or confirmed): that call's id.
FAILED_CALL = "deferred_signals_call_id"


def blame(error: BaseException, call: PendingCall) -> None:
    # A try/except around each call, not a context manager: free unless it raises.
    with suppress(AttributeError, TypeError):  # an exception that takes no attributes
        setattr(error, FAILED_CALL, call.id)


class Sender:
    """Publishes one call: a message built once per handler route, else ``apply_async``."""

    __slots__ = ("app", "builder", "producer", "push", "send", "shared")

    def __init__(self, app: Any, producer: Any) -> None:
        self.app = app
        self.producer = producer
        self.builder = MessageBuilder(app)
        self._start_batch()

    def _start_batch(self) -> None:
        """What each batch reads afresh, beyond the builder's configuration."""
        #: Redis: messages written as kombu would, without its per-message machinery.
        self.push = RedisPush.of(self.producer) if FAST_REDIS else None
        self.send = sentry.publishing(publish_message)
        #: The last signal call's body as text and its kwargsrepr, and what they came from.
        self.shared: tuple[Any, ...] = ()

    @classmethod
    def of(cls, app: Any, producer: Any) -> Sender:
        """The publisher of a batch on ``producer``: the one of its previous batch, brought
        up to date as a new one would be (configuration, push, Sentry), or a new one."""
        publish = getattr(producer, "_deferred_signals_publish", None)
        if type(publish) is not cls or publish.app is not app or publish.producer is not producer:
            publish = cls(app, producer)
            with suppress(AttributeError):  # a producer that takes no attributes: per batch
                producer._deferred_signals_publish = publish
            return publish
        publish.builder.refresh()
        publish._start_batch()
        return publish

    def __call__(self, call: PendingCall, remaining: float) -> None:
        task, options = call.handler.task, call.handler.merged.publish
        body = call.body  # a pending call builds its body on each read: once
        text, kwargsrepr = call.text, None
        if call.stored is None:
            # The handlers of one signal sent share its frozen arguments, hence one body:
            # its JSON and its summary are made once for all of them (the ten handlers of a
            # save), not once per handler.
            shared = self.shared
            if (
                shared
                and shared[0] is call.kwargs
                and shared[1] is call.sender
                and shared[2] == call.signal
                and shared[3] is call.at
            ):
                text, kwargsrepr = shared[4], shared[5]
            else:
                kwargsrepr = summary(body)
                # The text only matters to a Redis push, and only if no before_task_publish
                # receiver may change the body.
                if self.push is not None and not celery_signals.before_task_publish.receivers:
                    text = dumps_tree(body)  # built by thaw(): a tree, no cycle
                self.shared = (call.kwargs, call.sender, call.signal, call.at, text, kwargsrepr)
        message = self.builder.build(task, call.id, body, options, text, kwargsrepr)
        if message is None:
            with (
                nullcontext()
                if call.trace is None
                else propagation.continued_per_call(call.trace, call.id)
            ):
                publish_fallback(self.producer, task, call.id, body, options, timeout=remaining)
        elif call.trace is None:
            self.send(self.producer, message, timeout=remaining, push=self.push)
        else:  # a relayed call kept with its request's trace
            with propagation.continued(call.trace, message):
                self.send(self.producer, message, timeout=remaining, push=self.push)

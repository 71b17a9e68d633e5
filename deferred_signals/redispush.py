"""Task messages written to Redis the way kombu's Redis transport writes them, minus its detours.

``Producer.publish`` on kombu's Redis transport spends most of its time on what is the same
for every message of a batch: serializer lookup, ``_prepare``, the virtual channel's
``prepare_message`` and ``basic_publish`` bookkeeping, a new ``redis.Redis`` command per
message. A :class:`RedisPush` builds the very envelope kombu stores (the same keys and
values: base64 body, ``delivery_info``, ``delivery_tag``, priority) and writes a chunk of
them with one round trip: one ``LPUSH`` per run of consecutive messages to the same list
(``LPUSH key m1 m2 m3`` leaves them where three ``LPUSH`` commands would, and Redis takes all
or none of them; several runs go in one ``MULTI``/``EXEC``, refused whole, but for a run
whose key holds another type, refused alone), packed here and written on one connection of
the channel's pool that the producer keeps (a channel with ``global_keyprefix`` goes through
its own client, which prefixes the keys); priority queues are kombu's lists.

Celery's ``after_task_publish`` fires once a message is queued for its chunk's write, as with
kombu's own batches: a failed write spills the chunk after the signal. A receiver that raises
(Celery logs and swallows it) stops nothing: the write and Redis's answer decide.

Only the common shape is taken: the default (anonymous) exchange, the JSON serializer, no
compression, no queue with ``x-expires``; anything else is refused (:meth:`RedisPush.add`
returns False) and goes through ``Producer.publish`` as before.
"""

from __future__ import annotations

import base64
import inspect
import json
import select
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kombu import exceptions as kombu_exceptions
from kombu import serialization as kombu_serialization
from kombu.utils import json as kombu_json

from .exceptions import PublishRefused
from .ids import uuid4

_RedisChannel: Any
RedisConnectionError: Any
RedisResponseError: Any
RedisTimeoutError: Any
RedisWatchError: Any
try:  # kombu's Redis transport needs redis-py; without it there is nothing to speed up
    from kombu.transport.redis import Channel as _RedisChannel
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError as RedisResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError as RedisWatchError
except ImportError:  # pragma: no cover - redis-py is a test and example dependency
    _RedisChannel = RedisConnectionError = RedisResponseError = RedisTimeoutError = None
    RedisWatchError = None

#: kombu >= 5.7's error for a failed pipeline of its own (Redis's reply is its cause).
_BatchPublishError: Any = getattr(kombu_exceptions, "BatchPublishError", ())

if TYPE_CHECKING:
    from .messages import Message

__all__ = ["RedisPush"]

#: Arguments of ``Producer.publish`` a message property binds to, not properties there:
#: Celery's routing passes ``mandatory``, ``immediate`` and ``priority`` (often None), which
#: kombu's Redis transport ignores or turns into the priority; the others (a serializer's
#: content type, the transport's own fields) make a message take kombu's own path.
_IGNORED = ("mandatory", "immediate")
_REFUSED = ("content_type", "content_encoding", "delivery_info", "body_encoding", "delivery_tag")

#: What a kombu Redis channel must have for a push to write as kombu would (``_expires``,
#: the queues with x-expires, is read when present: kombu >= 5.6); ``RedisPush.of`` checks
#: each of them by name.
_CHANNEL_NEEDS = ("_q_for_pri", "_get_message_priority", "default_priority", "pool")

_plain_dumps = json.JSONEncoder().encode


def dumps(value: Any) -> str:
    """What ``kombu.utils.json.dumps`` returns, without building an encoder per call for the
    plain JSON that task messages nearly always are."""
    try:
        return _plain_dumps(value)
    except TypeError:  # a datetime or a UUID a tracing tool put in the headers
        return str(kombu_json.dumps(value))


def _tree_encoder() -> Any:
    """The C encoder ``JSONEncoder().encode`` makes for each call, made once and without its
    memo of the containers being encoded (what detects a cycle); None if this Python has no
    such encoder, or one that writes otherwise."""
    try:
        from _json import encode_basestring_ascii, make_encoder

        encoder = make_encoder(
            None, _plain_default, encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
        sample = {"a": [1, 2.5, None, True, '\u00e9\u2028"\\/'], "b": {"": -0.0, "n": 10**20}}
        return encoder if "".join(encoder(sample, 0)) == _plain_dumps(sample) else None
    except Exception:  # pragma: no cover - not CPython, or another signature
        return None


_plain_default = json.JSONEncoder().default
_tree = _tree_encoder()


def dumps_tree(value: Any) -> str:
    """:func:`dumps` for a value that holds no reference cycle, as a call's body, thawed from
    its frozen encoding, never does: the same text, ~1 us less (no encoder made per call)."""
    if _tree is None:
        return dumps(value)
    try:
        return "".join(_tree(value, 0))
    except TypeError:
        return str(kombu_json.dumps(value))


#: Stand-ins for what differs from one message of a route to the next, in its template.
_MARKS = {field: f"\x00deferred_signals:{field}\x00" for field in "bikext"}
#: Templates kept per push (routes: handlers times publish options, per configuration).
_MAX_LAYOUTS = 256


@dataclass(slots=True)
class _Template:
    """A route's envelope as a format string (None: the route's messages take kombu's
    path), the list it goes to, and what else it was made from."""

    route: Any
    queue: str
    origin: Any
    reply_to: Any
    delivery_mode: Any
    key: str
    text: str | None


class RedisPush:
    """The messages of one chunk for one kombu Redis channel, written with one round trip.

    Use: :meth:`add` each message (False: publish it through the producer instead), then
    :meth:`flush`, which raises if Redis did not take every command.
    """

    __slots__ = (
        "channel",
        "delivery_modes",
        "exchange",
        "exchange_mode",
        "ids",
        "layouts",
        "pending",
        "producer",
    )

    def __init__(self, producer: Any, channel: Any) -> None:
        self.producer = producer
        self.channel = channel
        self.pending: list[tuple[str, str]] = []
        #: The call id of each message of ``pending``, to say which ones Redis took.
        self.ids: list[str] = []
        self.delivery_modes: dict[Any, Any] = {}
        #: Envelope templates by route (``Message.layout``) id.
        self.layouts: dict[int, _Template] = {}
        #: The producer's default exchange and its delivery mode when the push was made.
        self.exchange: Any = None
        self.exchange_mode: Any = None

    @classmethod
    def of(cls, producer: Any) -> RedisPush | None:
        """A push for ``producer``'s channel, or None when it is not kombu's Redis channel."""
        channel = producer.channel
        if _RedisChannel is None or not isinstance(channel, _RedisChannel):
            return None
        # kombu internals this reproduces: a kombu without one of them publishes its own way.
        if not (
            hasattr(channel, "_q_for_pri")
            and hasattr(channel, "_get_message_priority")
            and hasattr(channel, "default_priority")
            and hasattr(channel, "pool")
            and hasattr(producer, "_delivery_details")
        ):
            return None
        if (channel.body_encoding or "").lower() != "base64":
            return None
        # A project that registered a JSON encoder of its own gets it, from kombu.
        json_codec = getattr(getattr(kombu_serialization, "registry", None), "_encoders", {}).get(
            "json"
        )
        if json_codec is not None and getattr(json_codec, "encoder", None) is not kombu_json.dumps:
            return None
        # One push per channel and producer, kept across batches for its templates, as
        # long as the producer's default exchange (its delivery mode) stays as it was.
        exchange = getattr(producer, "exchange", None)
        mode = getattr(exchange, "delivery_mode", None)
        push = getattr(channel, "_deferred_signals_push", None)
        if (
            type(push) is cls
            and push.producer is producer
            and push.exchange is exchange
            and push.exchange_mode == mode
        ):
            push.pending, push.ids = [], []  # left by a batch that failed before its write
            return push
        push = cls(producer, channel)
        push.exchange, push.exchange_mode = exchange, mode
        channel._deferred_signals_push = push
        return push

    def add(self, message: Message) -> bool:
        """Queue ``message``'s ``LPUSH``; False if it needs kombu's own path."""
        channel = self.channel
        queue = message.routing_key
        if (
            message.exchange != ""
            or not queue
            or message.serializer != "json"
            or message.compression
            # A queue with x-expires (kombu >= 5.6 keeps them, and refreshes them on use).
            or queue in (getattr(channel, "_expires", None) or ())
        ):
            return False
        layout = message.layout
        headers = message.headers
        if layout is None or layout[1] is not headers or layout[2] is not message.properties:
            # Headers or properties may have changed since the builder made them.
            made = self._envelope(message, queue)
            if made is None:
                return False
            self.pending.append((made[0], dumps(made[1])))
            self.ids.append(headers["id"])
            return True
        route = layout[0]
        template = self.layouts.get(id(route))
        if (
            template is None
            or template.route is not route
            or template.queue != queue
            or template.origin != headers["origin"]
            or template.reply_to != message.properties["reply_to"]
            or template.delivery_mode is not message.delivery_mode
        ):
            template = self._template(route, message, queue)
        if template.text is None:
            return False
        text = message.body_json
        if text is None:
            text = dumps(message.body)
        eta, expires = headers["eta"], headers["expires"]
        self.pending.append(
            (
                template.key,
                template.text.format(
                    b=f'"{base64.b64encode(text.encode("utf-8")).decode("ascii")}"',
                    i=_plain_dumps(headers["id"]),
                    k=_plain_dumps(headers["kwargsrepr"]),
                    e="null" if eta is None else dumps(eta),
                    x="null" if expires is None else dumps(expires),
                    t=f'"{uuid4()}"',
                ),
            )
        )
        self.ids.append(headers["id"])
        return True

    def _envelope(self, message: Message, queue: str) -> tuple[str, dict[str, Any]] | None:
        """The list to push ``message`` to and the envelope kombu would store; None if the
        message needs kombu's own path."""
        channel = self.channel
        properties = dict(message.properties)
        if any(properties.get(name) is not None for name in _REFUSED):
            return None
        for name in (*_IGNORED, *_REFUSED):
            properties.pop(name, None)
        priority = properties.pop("priority", 0)
        # Producer.publish: the delivery mode, resolved against its default exchange.
        mode = self.delivery_modes.get(message.delivery_mode)
        if mode is None:
            mode = self.producer._delivery_details("", message.delivery_mode)[1]
            self.delivery_modes[message.delivery_mode] = mode
        properties["delivery_mode"] = mode
        expiration = properties.pop("expiration", None)  # a handler's expires, in seconds
        if expiration is not None:
            properties["expiration"] = str(int(expiration * 1000))
        # Channel.prepare_message and basic_publish (_inplace_augment_message).
        properties["delivery_info"] = {"exchange": "", "routing_key": queue}
        properties["priority"] = priority or channel.default_priority
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = uuid4()
        text = message.body_json
        if text is None:
            text = dumps(message.body)
        body = base64.b64encode(text.encode("utf-8")).decode("ascii")
        envelope = {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers or {},
            "properties": properties,
        }
        # Channel._put: the priority picks the list, as kombu's consumers expect.
        key = channel._q_for_pri(queue, channel._get_message_priority(envelope, reverse=False))
        return key, envelope

    def _template(self, route: Any, message: Message, queue: str) -> _Template:
        """The envelope of the messages of ``route`` (``message``'s), as a format string
        whose fields are what differs from one message of the route to the next."""
        made = self._envelope(message, queue)
        text = None
        if made is not None:
            key, envelope = made
            headers = dict(envelope["headers"])
            properties = dict(envelope["properties"])
            envelope = {**envelope, "headers": headers, "properties": properties}
            # What the builder puts in each message of a route (see MessageBuilder.build):
            # the call's id three times, its summary, eta, expires; and the delivery tag.
            envelope["body"] = _MARKS["b"]
            headers["id"] = headers["root_id"] = properties["correlation_id"] = _MARKS["i"]
            headers["kwargsrepr"] = _MARKS["k"]
            headers["eta"] = _MARKS["e"]
            headers["expires"] = _MARKS["x"]
            properties["delivery_tag"] = _MARKS["t"]
            text = dumps(envelope).replace("{", "{{").replace("}", "}}")
            counts = {"b": 1, "i": 3, "k": 1, "e": 1, "x": 1, "t": 1}
            for field, mark in _MARKS.items():
                encoded = _plain_dumps(mark)
                if text.count(encoded) != counts[field]:
                    text = None  # a constant of the route holds a mark: encode each message
                    break
                text = text.replace(encoded, f"{{{field}}}")
        else:
            key = queue
        template = _Template(
            route,
            queue,
            message.headers["origin"],
            message.properties["reply_to"],
            message.delivery_mode,
            key,
            text,
        )
        if len(self.layouts) >= _MAX_LAYOUTS:
            self.layouts.clear()
        self.layouts[id(route)] = template
        return template

    def flush(self, timeout: float | None = None) -> None:
        """Write the queued messages in one round trip; raise unless Redis took them all.

        ``timeout``: the most any socket operation may take (the time left to publish).
        A list refused for its key's type (``WRONGTYPE``) raises :class:`PublishRefused`,
        naming the calls Redis took all the same (``published_after``) and the first
        refused one (``refused_call``).
        """
        pending, self.pending = self.pending, []
        ids, self.ids = self.ids, []
        if not pending:
            return
        connection = _connection(self.channel)
        if connection is not None and timeout is not None:
            # A connection opened for this write takes its socket timeout from here.
            connection.socket_timeout = max(timeout, 0.001)
        runs = _runs(pending)
        # Redis runs each command of a pipeline on its own: when memory is short it can refuse
        # a long LPUSH (OOM) and take a short one after it, and the caller, which spills a
        # failed chunk whole, would publish that one twice. In MULTI/EXEC, Redis refuses every
        # command of the chunk if it refuses one (OOM, READONLY, MISCONF, NOAUTH...); only a
        # command failing as it runs (WRONGTYPE) leaves the others run: see _refused.
        whole = len(runs) > 1
        if connection is None:  # keys to prefix: the channel's own client does it
            with self.channel.conn_or_acquire() as client, client.pipeline(whole) as pipe:
                for key, values in runs:
                    pipe.lpush(key, *values)
                # An error reply before EXEC raises; one of a command as it ran is returned.
                replies = pipe.execute(raise_on_error=False)
            _refused(runs, replies, ids, whole)
            return
        try:
            if whole:
                connection.send_packed_command([_MULTI, _pack(runs), _EXEC])
                replies = _read_transaction(connection, len(runs))
            else:
                connection.send_packed_command([_pack(runs)])
                replies = [connection.read_response()]  # an error reply raises
        except RedisResponseError as error:
            if whole or not wrong_type(error):
                connection.disconnect()  # replies may be left unread
                raise
            replies = [error]  # the one LPUSH, answered: the connection is in step
        except BaseException:
            # Replies may be left unread: this connection must never serve another batch.
            connection.disconnect()
            raise
        _refused(runs, replies, ids, whole)


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"


def wrong_type(error: BaseException | None) -> bool:
    """Redis's ``WRONGTYPE``: the key of a queue holds another type (a string, a hash), so
    Redis refuses that list's commands (``LPUSH``, and ``LLEN`` in kombu's declare) and
    takes the others: a refusal of that queue's calls, not an outage. Also when kombu's own
    pipeline met it (the calls the push leaves to kombu): its ``BatchPublishError`` carries
    Redis's reply as its cause."""
    if isinstance(error, _BatchPublishError):
        error = error.__cause__
    return (
        RedisResponseError is not None
        and isinstance(error, RedisResponseError)
        # redis-py puts "Command # n (...) of pipeline caused error: " before Redis's words
        and "WRONGTYPE " in str(error)
    )


def _refused(
    runs: list[tuple[str, list[str]]], replies: list[Any], ids: list[str], whole: bool
) -> None:
    """Raise unless each run's reply says Redis took it: a :class:`PublishRefused` naming
    the calls of the runs it took all the same when one failed as it ran in ``MULTI``/``EXEC``
    (Redis runs the others whatever it replies: spilled whole, their calls would be published
    twice), or when the key of the one run holds another type; else Redis's error (``OOM``,
    ``READONLY``...: an outage).
    """
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is None:
        return
    if not isinstance(failed, RedisResponseError) or not (whole or wrong_type(failed)):
        raise failed
    taken: list[str] = []
    refused: list[str] = []
    keys: set[str] = set()
    at = 0
    for (key, values), reply in zip(runs, replies, strict=True):
        if isinstance(reply, Exception):
            refused.extend(ids[at : at + len(values)])
            keys.add(key)
        else:
            taken.extend(ids[at : at + len(values)])
        at += len(values)
    error = PublishRefused(
        f"Redis refused {len(refused)} message(s) to {', '.join(sorted(keys))} ({failed}) and took "
        f"the {len(taken)} other(s) of their transaction"
    )
    error.published_after = frozenset(taken)
    error.refused_call = refused[0] if refused else None
    raise error from failed


def _read_transaction(connection: Any, commands: int) -> list[Any]:
    """Read the replies to ``MULTI``, ``commands`` commands and ``EXEC``: raise the first
    error reply before ``EXEC`` (Redis then ran nothing), having read them all; return the
    replies of the commands, an error reply of one that failed as it ran among them."""
    refused = None
    for _ in range(commands + 1):  # MULTI's OK, then QUEUED or a refusal for each command
        try:
            connection.read_response()
        except RedisResponseError as error:
            refused = refused or error
    try:
        replies = connection.read_response()  # EXECABORT if a command was refused
    except RedisResponseError:
        if refused is None:
            raise
        replies = None
    if refused is not None:
        raise refused  # Redis's own words (OOM...), not EXECABORT's
    if replies is None:
        # A nil EXEC: Redis aborted the transaction (a WATCHed key changed) and ran none of
        # its commands. Nothing issues WATCH today; taken as success, the calls would be lost.
        raise RedisWatchError("Redis aborted the transaction (EXEC replied nil): nothing ran")
    if len(replies) != commands:
        raise RedisResponseError(f"EXEC replied {len(replies)} results for {commands} commands")
    return list(replies)


def _runs(pending: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The messages of ``pending`` grouped into runs of consecutive ones to the same list.

    One ``LPUSH`` per run keeps the order of the messages (each value is pushed in turn, as
    separate commands would push them) and costs Redis and redis-py one reply, not one per
    message: the ten handlers of one save, or a chunk of a hundred calls routed to one
    queue, are one command each.
    """
    runs: list[tuple[str, list[str]]] = []
    last = None
    for key, data in pending:
        if key == last:
            runs[-1][1].append(data)
        else:
            runs.append((key, [data]))
            last = key
    return runs


def _pack(runs: list[tuple[str, list[str]]]) -> bytes:
    """``LPUSH key value...`` for each run, in the Redis protocol (RESP), ready to send."""
    parts = []
    for key, values in runs:
        k = key.encode()
        parts.append(b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%b\r\n" % (len(values) + 2, len(k), k))
        for value in values:
            v = value.encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(v), v))
    return b"".join(parts)


def _connection(channel: Any) -> Any:
    """A redis-py connection of ``channel``'s pool kept for our publishes, or None.

    redis-py's client spends more per command than the round trip itself on loopback (pool
    checkout with a readiness poll of the socket, retry and observability wrappers); a
    producer of ours is used by one thread at a time, so it keeps one connection checked out
    and writes the packed commands on it. The pool still lists it (in use): the socket
    timeouts of :func:`deferred_signals.broker.bound_sockets` and the channel's close reach
    it. A channel that prefixes keys (``global_keyprefix``) goes through its client.
    """
    if getattr(channel, "global_keyprefix", ""):
        return None
    connection = getattr(channel, "_deferred_signals_connection", None)
    if connection is None:
        connection = _checkout(channel.pool)
        channel._deferred_signals_connection = connection
    elif connection._sock is not None and _stale(connection):
        # What redis-py's pool checks at every checkout: the server closed it (a restart,
        # an idle timeout, CLIENT KILL) or left data on it. It reconnects on the next write.
        connection.disconnect()
    return connection


def _checkout(pool: Any) -> Any:
    """A connection of ``pool``: redis-py < 5.3 wants a command's name, later ones warn
    when given one."""
    try:
        wanted = inspect.signature(pool.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):  # no signature to read
        wanted = None
    if wanted is not None and wanted.default is inspect.Parameter.empty:
        return pool.get_connection("LPUSH")
    return pool.get_connection()


#: select.poll, where there is one (not on Windows).
_poll: Any = getattr(select, "poll", None)


def _stale(connection: Any) -> bool:
    """redis-py's ``can_read()``: bytes left in its parser's buffer, or on the socket (data,
    or the server's close or reset). Its pure-Python parsers are asked with one ``poll``,
    not with a non-blocking ``recv`` that raises, caught inside (~2 us less a commit)."""
    sock = connection._sock
    unread = getattr(
        getattr(getattr(connection, "_parser", None), "_buffer", None), "unread_bytes", None
    )
    if _poll is None or sock is None or unread is None:  # hiredis, or no socket to poll
        return _can_read(connection)
    try:
        if unread():
            return True
        poll = _poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))  # readable, hung up or failed
    except (OSError, ValueError):  # a socket closed under it
        return True


def _can_read(connection: Any) -> bool:
    try:
        return bool(connection.can_read())
    except (ConnectionError, OSError, RedisConnectionError, RedisTimeoutError):
        return True

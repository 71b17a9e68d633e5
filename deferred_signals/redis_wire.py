"""Redis on the wire for :class:`~deferred_signals.redispush.RedisPush`: a chunk of ``LPUSH``
commands packed in the Redis protocol, written on a connection of the channel's pool kept
for our publishes, and Redis's replies read back into what it took and what it refused.

Several runs of a chunk go in one ``MULTI``/``EXEC``: Redis refuses every command if it
refuses one before ``EXEC`` (``OOM``, ``READONLY``, ``MISCONF``, ``NOAUTH``), but a command
failing as it runs (``WRONGTYPE``: the key holds another type) leaves the others run, so
:func:`raise_refused` names the calls Redis took all the same.
"""

from __future__ import annotations

import inspect
import select
from typing import Any

from kombu import exceptions as kombu_exceptions

from .exceptions import PublishRefused

RedisConnectionError: Any
RedisResponseError: Any
RedisTimeoutError: Any
RedisWatchError: Any
try:  # kombu's Redis transport needs redis-py
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError as RedisResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError as RedisWatchError
except ImportError:  # pragma: no cover - redis-py is a test and example dependency
    RedisConnectionError = RedisResponseError = RedisTimeoutError = RedisWatchError = None

#: kombu >= 5.7's error for a failed pipeline of its own (Redis's reply is its cause).
_BatchPublishError: Any = getattr(kombu_exceptions, "BatchPublishError", ())

MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"


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


def raise_refused(
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


def read_transaction(connection: Any, commands: int) -> list[Any]:
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


def runs(pending: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
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


def pack(runs: list[tuple[str, list[str]]]) -> bytes:
    """``LPUSH key value...`` for each run, in the Redis protocol (RESP), ready to send."""
    parts = []
    for key, values in runs:
        k = key.encode()
        parts.append(b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%b\r\n" % (len(values) + 2, len(k), k))
        for value in values:
            v = value.encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(v), v))
    return b"".join(parts)


def connection_of(channel: Any) -> Any:
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
        connection = checkout(channel.pool)
        channel._deferred_signals_connection = connection
    elif connection._sock is not None and stale(connection):
        # What redis-py's pool checks at every checkout: the server closed it (a restart,
        # an idle timeout, CLIENT KILL) or left data on it. It reconnects on the next write.
        connection.disconnect()
    return connection


def checkout(pool: Any) -> Any:
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


def stale(connection: Any) -> bool:
    """redis-py's ``can_read()``: bytes left in its parser's buffer, or on the socket (data,
    or the server's close or reset). Its pure-Python parsers are asked with one ``poll``,
    not with a non-blocking ``recv`` that raises, caught inside (~2 us less a commit)."""
    sock = connection._sock
    unread = getattr(
        getattr(getattr(connection, "_parser", None), "_buffer", None), "unread_bytes", None
    )
    if _poll is None or sock is None or unread is None:  # hiredis, or no socket to poll
        return can_read(connection)
    try:
        if unread():
            return True
        poll = _poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))  # readable, hung up or failed
    except (OSError, ValueError):  # a socket closed under it
        return True


def can_read(connection: Any) -> bool:
    try:
        return bool(connection.can_read())
    except (ConnectionError, OSError, RedisConnectionError, RedisTimeoutError):
        return True

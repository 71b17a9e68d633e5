"""How long a message may stay unacknowledged before its broker hands it out again.

Redis (and Sentinel) emulate acknowledgements: a message a worker took and has not
acknowledged for ``visibility_timeout`` seconds goes back to the queue, a retry waiting for
its countdown included, and then runs once more per redelivery. AMQP brokers have no such
timeout on an open connection.
"""

from __future__ import annotations

from typing import Any

#: kombu's default ``visibility_timeout``, in seconds.
REDIS_DEFAULT = 3600


def visibility_timeout(app: Any) -> float | None:
    """The ``visibility_timeout`` of the broker ``app``'s workers consume from, or None when
    it has none (not Redis)."""
    # Workers consume from broker_read_url when it is set: that broker redelivers.
    url = app.conf.broker_read_url or app.conf.broker_url
    if isinstance(url, (list, tuple)):  # failover URLs (of one broker kind): read the first
        url = url[0] if url else ""
    if not str(url or "").startswith(("redis", "rediss", "sentinel")):
        return None
    options = app.conf.broker_transport_options or {}
    timeout: float = options.get("visibility_timeout", REDIS_DEFAULT)
    return timeout

"""The web side's way to the broker, which the demo cuts while the worker keeps running.

The demo's own process (the web side) and the relay it starts publish through a link of the
demo's; the worker reaches the broker directly. Cutting the link makes every real publish of
the web side fail, as a broker outage or a partition would, while the worker carries on.

- kombu's filesystem broker: the web side writes its messages through ``.demo/broker/link``, a
  symbolic link to the queue folder. Cutting replaces the link with a plain file, so opening
  a message file under it fails with "Not a directory", for root too (permissions would not
  stop root); restoring puts the link back.
- any other broker URL: the web side connects through a loopback TCP proxy of the demo's
  (demo/proxy.py); cutting resets its connections and refuses new ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

from example_project.celery import app

from .proxy import TCPProxy

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}


class BrokerLink:
    """``via``: what DEMO_PUBLISH_VIA says to a process that should publish through the link."""

    via = ""
    what = ""

    def open(self) -> BrokerLink:
        """Create the link and route this process's publishing through it (before it publishes:
        the package keeps its broker connections)."""
        raise NotImplementedError

    def cut(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Leave the broker reachable again: called in a ``finally``."""
        with contextlib.suppress(OSError):
            self.restore()


class FolderLink(BrokerLink):
    what = "a symbolic link to the broker's queue folder"

    def __init__(self) -> None:
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        self.queues = Path(options["data_folder_in"])
        self.path = self.queues.parent / "link"
        self.via = str(self.path)

    def open(self) -> FolderLink:
        self.restore()
        options = {**(app.conf.broker_transport_options or {}), "data_folder_out": self.via}
        _configure(broker_transport_options=options)
        return self

    def cut(self) -> None:
        self._replace_with(lambda tmp: tmp.write_text("the demo cut the broker here\n"))

    def restore(self) -> None:
        self._replace_with(lambda tmp: tmp.symlink_to(self.queues.name))

    def _replace_with(self, make: Callable[[Path], object]) -> None:
        # Made aside, then renamed over the link: a publish sees the old or the new, never none.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        make(tmp)
        os.replace(tmp, self.path)


class ProxyLink(BrokerLink):
    what = "a loopback TCP proxy of the demo's"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        if port is None:
            raise ValueError(f"the demo cannot cut {parts.scheme}:// brokers (no known port)")
        self.proxy = TCPProxy(parts.hostname or "127.0.0.1", port)

    def open(self) -> ProxyLink:
        self.proxy.start()
        parts = urlsplit(self.url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@" if credentials else ""
        netloc += f"127.0.0.1:{self.proxy.port}"
        self.via = urlunsplit(parts._replace(netloc=netloc))
        _configure(broker_write_url=self.via)
        return self

    def cut(self) -> None:
        self.proxy.cut()

    def restore(self) -> None:
        self.proxy.restore()

    def close(self) -> None:
        self.proxy.close()


def _configure(**changes: Any) -> None:
    """Change Celery settings at run time, under the names the project's settings use too.

    The app reads Django's settings with the ``CELERY`` namespace; Celery 5.5 then answers
    from the namespaced key (``CELERY_BROKER_TRANSPORT_OPTIONS``) before a plain one updated
    later, so an update of the plain name alone would not be seen there.
    """
    app.conf.update(changes, **{f"CELERY_{name.upper()}": value for name, value in changes.items()})


def broker_link() -> BrokerLink:
    url = str(app.conf.broker_url)
    if url.startswith("filesystem://"):
        return FolderLink()
    return ProxyLink(url)

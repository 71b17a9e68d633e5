"""kombu's filesystem transport, with each message file written whole before it appears.

kombu's ``filesystem`` channel creates a message's file under its final name, then writes
it; its consumer moves and reads any file with that name, without a lock. A worker that
polls in between reads an empty file, fails on ``JSONDecodeError`` and restarts its
consumer (seen as a flaky ``make demo``). Here a message is written under a name the
consumer ignores, then renamed into place: a rename within one folder is atomic.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The consumer takes "<anything>.<queue>.msg" (kombu's naming, kept): ".part" after
        # it hides the file until it is complete.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

"""kombu's filesystem broker with atomic writes (used by the SQLite stack: demo and tests).

kombu's own ``_put`` creates ``<name>.msg`` and then writes it, and a consumer
may move the file away in between: it reads an empty message (the worker stops
with ``JSONDecodeError``) and the writer's bytes go to the moved file (the task
is lost). Here the message is written under a name no consumer matches and then
renamed into place, which is atomic on POSIX.
"""

from __future__ import annotations

import os
import time
import uuid

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: The URL scheme (``fulldbfs://``) registered in settings.
SCHEME = "fulldbfs"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"  # kombu's
        # ".tmp-...": consumers only take names whose text after the first dot is "<queue>.msg".
        temporary = os.path.join(self.data_folder_out, f".tmp-{uuid.uuid4()}")
        try:
            with open(temporary, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(temporary, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def register() -> None:
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault(SCHEME, "testproject.fsbroker:Transport")

"""A loopback TCP proxy that can simulate a server outage.

The soak suite shares the machine's PostgreSQL, MariaDB, RabbitMQ and Redis
with other users, so it never stops them. Instead the processes under test
connect through this proxy, and :meth:`FaultProxy.outage` does to them what a
server restart does: every open connection is reset and new connections are
refused (the listening socket is closed) for the given time, then accepted
again. From the client's side that is a restart; see "Soak and fault tests" in
docs/design.md.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

_BUFFER = 65536


def _reset(sock: socket.socket) -> None:
    """Close both directions at once, as the kernel does when the server process dies.

    ``shutdown`` comes first: a plain ``close`` does not wake this proxy's thread blocked
    in ``recv`` on the socket, so the kernel would keep it open and the client would wait
    on a silent connection forever (a network black hole, not a restart).
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _bind_outside_ephemeral_range(listener: socket.socket) -> None:
    """Bind a free port below the ephemeral range (Linux: 32768-60999).

    While the proxy is down its port is free; a client connecting to it may then be
    given that very port as its own source port and connect to itself (TCP simultaneous
    open) instead of being refused, and keep the port taken.
    """
    for port in random.sample(range(20000, 32000), 200):
        try:
            listener.bind(("127.0.0.1", port))
            return
        except OSError:
            continue
    raise OSError("no free port for the fault proxy in 20000-32000")


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` until stopped."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._listener: socket.socket | None = None
        self._up = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections = 0
        self.resets = 0

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listen()
        self._up.set()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._up.clear()
        self._close_listener()
        self.drop_all()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------

    def drop_all(self) -> int:
        """Reset every proxied connection; return how many there were."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        self.resets += len(pairs)
        return len(pairs)

    def down(self) -> int:
        """Start an outage: refuse new connections and reset the open ones."""
        self._up.clear()
        self._close_listener()
        return self.drop_all()

    def up(self) -> None:
        """End the outage: listen on the same port again."""
        self._listen()
        self._up.set()

    @contextlib.contextmanager
    def outage_during(self) -> Iterator[None]:
        self.down()
        try:
            yield
        finally:
            self.up()

    def outage(self, seconds: float) -> int:
        """Down for ``seconds`` (blocking), then up; return the connections reset."""
        dropped = self.down()
        time.sleep(seconds)
        self.up()
        return dropped

    # -- internals ----------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.port:
            listener.bind(("127.0.0.1", self.port))
        else:
            _bind_outside_ephemeral_range(listener)
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown stops accepting at once, even while the accept thread polls it.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None or not self._up.is_set():
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (client, upstream)
        with self._lock:
            if not self._up.is_set():
                _reset(client)
                _reset(upstream)
                return
            self._pairs.add(pair)
            self.connections += 1
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple) -> None:
        try:
            while True:
                data = source.recv(_BUFFER)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            owned = pair in self._pairs
            self._pairs.discard(pair)
        if owned:  # a normal close on one side: close the other side too
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

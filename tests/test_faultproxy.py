"""The soak suite's fault proxy does to clients what a server restart does."""

from __future__ import annotations

import socket
import threading

import pytest

from soak.faultproxy import FaultProxy


@pytest.fixture
def echo_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(100):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_outage_closes_open_connections_refuses_new_ones_then_recovers(echo_server):
    with FaultProxy(echo_server) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"hello")
        assert client.recv(10) == b"hello"
        with proxy.outage_during():
            # The open connection ends at once (not a silent hang) ...
            assert client.recv(10) == b""
            # ... and new ones are refused while the "server" is down.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"back")
        assert again.recv(10) == b"back"
        assert proxy.resets == 1

"""A threaded WSGI server for the test project (a thread per request, as the stdlib's
``ThreadingWSGIServer``): tests count the database sessions a publishing web process keeps.
``python -m testproject.webserver PORT``."""

import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.wsgi import get_wsgi_application

    server = make_server(
        "127.0.0.1",
        int(sys.argv[1]),
        get_wsgi_application(),
        server_class=ThreadingWSGIServer,
        handler_class=QuietHandler,
    )
    print("serving", flush=True)
    server.serve_forever()

"""optuna-dashboard served live while a run searches (``--dashboard``)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import NaslocError

if TYPE_CHECKING:
    pass


class DashboardError(NaslocError):
    """--dashboard could not be served."""


def serve_dashboard(storage: str, port: int) -> Any:
    """optuna-dashboard on 127.0.0.1:port in a daemon thread; returns the server (call shutdown(), then
    server_close()). A port that is taken raises :class:`DashboardError` (exit status 2)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna_dashboard

    from ..storage.factory import open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep request logs out of the progress bars
            pass

    class Server(ThreadingMixIn, WSGIServer):  # a slow API call must not hold up the page
        daemon_threads = True

    app = optuna_dashboard.wsgi(open_storage(storage))
    try:
        server = make_server("127.0.0.1", port, app, server_class=Server, handler_class=Quiet)
    except OSError as err:
        raise DashboardError(f"--dashboard-port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err}); "
                             "choose another port") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="optuna-dashboard").start()
    print(f"[nasloc] dashboard: http://127.0.0.1:{port}/dashboard", flush=True)
    return server

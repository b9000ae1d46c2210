"""``handclip serve``: a local web page to search a gallery with a questioned photo (FastAPI + uvicorn,
a plain HTML/JS page, no build step). See :mod:`handclip.serve.app` for the API and its safety rules."""
from __future__ import annotations

import errno
import os
import socket

from handclip.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def run_server(db: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               calibration: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               device: str = "cpu") -> None:
    """Serve the page and the API until interrupted. Any host but the loopback needs a ``token``."""
    if host not in LOCAL_HOSTS and not token:
        raise UserError(f"--host {host}: serving beyond this machine needs --token TOKEN "
                        f"(clients then send 'Authorization: Bearer TOKEN')")
    sock = bind(host, port)
    try:
        import uvicorn

        from handclip.search.searcher import Searcher
        from handclip.serve.app import create_app

        searcher = Searcher(db, checkpoint=checkpoint, calibration=calibration, device=device)
        app = create_app(searcher, token=token)
        shown = f"[{host}]" if ":" in host else host
        print(f"handclip serve: http://{shown}:{sock.getsockname()[1]}/ ({len(searcher.sha256s)} images in {db}; "
              f"Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port in use or a bad address is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise UserError(f"--host {host}: not an address this machine can listen on ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (choose another --port)") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    return sock

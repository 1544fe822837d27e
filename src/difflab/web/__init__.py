"""``difflab serve``'s web server: a page people use to generate (live progress, x̂0 preview,
cancel, queue position), browse a gallery, run human A/B evaluations and read sweep results,
and the JSON / PNG HTTP API behind it (README.md, "HTTP API").

Modules: ``app`` (the Starlette app and its limits), ``jobs`` (the sampling queue and its
worker thread), ``validate`` (request checks), ``gallery`` (the image folder), ``ab`` (votes in
SQLite, Bradley–Terry ranking), ``page`` (the HTML; ``static/`` holds its JS and CSS).
Importing this package needs ``starlette`` and ``uvicorn`` (dependencies of difflab).
"""

from __future__ import annotations

from typing import Any

from .ab import ABStore, bradley_terry
from .app import WebServer, create_app, is_loopback

__all__ = ["ABStore", "WebServer", "bradley_terry", "create_app", "is_loopback", "serve"]


def serve(
    pipe: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    log: bool = True,
    **options: Any,
) -> None:
    """Serve ``pipe`` until Ctrl-C (``options``: ``create_app``'s).

    :raises ValueError: a host other than loopback without a ``token``.
    """
    import uvicorn

    if not is_loopback(host) and not token:
        raise ValueError(
            f"--host {host} opens the server beyond this machine; give it a --token "
            "(or serve on 127.0.0.1)"
        )
    app = create_app(pipe, token=token, **options)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info" if log else "warning",
        timeout_keep_alive=5,
        limit_concurrency=128,
        timeout_graceful_shutdown=3,
    )

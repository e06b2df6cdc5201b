"""One HTTP server for the web app and the API: the FastAPI routes, the Gradio page mounted at ``/``.

:func:`serve` runs it in the foreground (``controlnet serve``); :func:`start` runs it on a thread
and returns a handle with its URL (tests, notebooks). Both load the models before listening, so a
missing or mismatched model file is an error at start, not at the first request.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from .service import ServeConfig, Service

__all__ = ["RunningServer", "create_app", "serve", "start"]

# Gradio's usage statistics would call out to the network; this project never does at run time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def create_app(service: Service):  # -> fastapi.FastAPI
    """The ASGI app: ``/api/*`` routes first, then the Gradio page at ``/``."""
    import gradio as gr

    from .a1111_api import add_routes
    from .api import create_api
    from .app import build_ui

    api = create_api(service)
    add_routes(api, service)  # the A1111 web UI's API beside ours
    ui = build_ui(service)
    ui.queue(max_size=service.limits.max_queue, default_concurrency_limit=1)
    # system fonts: the default theme would ask the browser to fetch fonts from the internet
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return gr.mount_gradio_app(
        api,
        ui,
        path="/",
        allowed_paths=[str(service.out_dir.resolve()), str(service.upload_dir.resolve())],
        max_file_size=int(service.limits.max_upload_mb * 1e6),
        footer_links=["gradio", "settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        theme=theme,
    )


@dataclass
class RunningServer:
    """A server running on a background thread."""

    url: str
    service: Service
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop serving, finish queued work, remove the temporary files."""
        self._server.should_exit = True  # type: ignore[attr-defined]
        self._thread.join(timeout=30)
        self.service.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _uvicorn(service: Service):
    import uvicorn

    config = uvicorn.Config(
        create_app(service), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


def start(
    config: ServeConfig, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0
) -> RunningServer:
    """Load the models and serve on a background thread; ``port`` 0 picks a free port."""
    sock = _bind(host, port)
    service = Service(config)
    try:
        server = _uvicorn(service)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="controlnet-http"
        )
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
    except BaseException:
        service.close()
        sock.close()
        raise
    return RunningServer(_url(sock), service, server, thread)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the models and serve until Ctrl-C or SIGTERM; then finish the running generation and
    remove the temporary files. (The server runs on a thread so that this thread owns the signals:
    uvicorn would re-raise them after its own shutdown and end the process before the clean-up.)"""
    server = start(config, host, port)
    kept = f"results in {server.service.out_dir}" if config.out_dir else "results kept until it stops"
    print(f"controlnet serve: {server.url} (web app; HTTP API under /api); {kept}", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while server._thread.is_alive() and not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()

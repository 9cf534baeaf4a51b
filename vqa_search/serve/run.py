"""`vqa-search serve`: check the arguments, find the indexes, then run uvicorn until Ctrl-C."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from vqa_search.core.errors import UserError
from vqa_search.serve.state import ServeConfig, Server, check_binding, discover_indexes


def _server_packages():
    from importlib.util import find_spec

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        if find_spec(module) is None and (module != "python_multipart" or find_spec("multipart") is None):
            raise UserError(f"serving needs {package}: pip install 'vqa-search[serve]'")
    import uvicorn

    return uvicorn


def build_server(index_dirs: list[Path], reranker: Path | None = None, head: Path | None = None,
                 token: str | None = None, cors: list[str] | None = None, **config) -> Server:
    """The arguments checked (one UserError for the first wrong one) and the indexes found."""
    for what, path in (("--reranker", reranker), ("--head", head)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{what} {path}: no such file")
    if token is not None and not token.strip():
        raise UserError("--token is empty")
    names = discover_indexes(index_dirs)
    return Server(ServeConfig(indexes=list(names.values()), reranker=reranker, head=head,
                              token=token.strip() if token else None, cors=list(cors or []), **config), names)


def serve_forever(index_dirs: list[Path], host: str = "127.0.0.1", port: int = 8000, reranker: Path | None = None,
                  head: Path | None = None, token: str | None = None, cors: list[str] | None = None,
                  echo: Callable[[str], None] = print) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535 (got {port})")
    warning = check_binding(host, token)
    uvicorn = _server_packages()
    server = build_server(index_dirs, reranker, head, token, cors)
    from vqa_search.serve.app import create_app

    if warning:
        echo(f"warning: {warning}")
    where = f"[{host}]" if ":" in host else host
    listening = listen(host, port)
    echo(f"serving {len(server.indexes)} index(es) ({', '.join(server.indexes)}) at "
         f"http://{where}:{listening.getsockname()[1]}/ - the model loads in the background; GET /api/health "
         "says when it is ready")
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listening])


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one line (uvicorn would exit with 1)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        bound = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        where = f"[{host}]" if ":" in host else host
        raise UserError(f"cannot listen on {where}:{port}: {error.strerror or error}") from None
    # asyncio turns Nagle off only on connections whose socket says IPPROTO_TCP, and create_server's
    # says 0: with Nagle on, a keep-alive client waited 40 ms (its delayed ACK) for every body.
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=bound.detach())

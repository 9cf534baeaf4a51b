"""The server follows its index: a generation committed by `vqa-search index` is live at the next
request, without a restart, while a request already running finishes on the generation it started
with. And `vqa-search serve` as a command: its user errors, and a real start on a free port."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from conftest import COLOURS, photos_folder, running_server, tiny_config, write_photo
from vqa_search.cli import app as cli
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.serve.state import check_binding

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def _get(url: str) -> tuple[dict, dict]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read()), dict(response.headers)


def test_a_new_generation_is_live_at_the_next_request_and_a_running_one_finishes_on_its_own(tmp_path):
    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    root = photos_folder(tmp_path / "photos")
    build_index(root, BuildConfig(**tiny_config()))
    server = build_server([root])
    with running_server(create_app(server, warm_in_background=False)) as url:
        search = f"{url}/api/indexes/photos/search?q=a%20picture&k=50"
        body, headers = _get(search)
        assert len(body["results"]) == 6 and headers["x-index-generation"] == "1"

        in_flight: dict = {}
        with server.compute:  # the next request takes its generation, then waits for the model
            running = threading.Thread(target=lambda: in_flight.update(zip(("body", "headers"), _get(search))))
            running.start()
            time.sleep(0.5)
            write_photo(root / "Images" / "photo_new.png", COLOURS[8])
            build_index(root, BuildConfig(**tiny_config()))  # commits generation 2 underneath
        running.join(60)
        assert in_flight["headers"]["x-index-generation"] == "1" and len(in_flight["body"]["results"]) == 6

        body, headers = _get(search)
        assert headers["x-index-generation"] == "2" and len(body["results"]) == 7
        new_id = next(hit["image_id"] for hit in body["results"] if hit["image"] == "photo_new.png")
        with urllib.request.urlopen(f"{url}/api/indexes/photos/thumbnails/{new_id}", timeout=60) as response:
            assert response.status == 200
        assert _get(f"{url}/api/indexes")[0]["indexes"][0]["generation"] == 2


@pytest.mark.parametrize("args, says", [
    (["--host", "0.0.0.0"], "--token"),
    (["--host", "192.0.2.1", "--token", "  "], "--token is empty"),
    (["--index", "/nonexistent/folder"], "no such folder"),
    (["--port", "70000"], "--port"),
])
def test_user_errors_are_one_line_and_exit_2(args, says, tmp_path, monkeypatch):
    monkeypatch.delenv("VQA_SEARCH_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(cli, ["serve", *args])
    assert done.exit_code == 2, done.output
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error:") and says in done.stderr


def test_more_user_errors(serve_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, says in ((["--index", str(serve_world), "--reranker", "missing.safetensors"], "no such file"),
                       (["--index", str(serve_world), "--head", "missing.safetensors"], "no such file"),
                       (["--index", str(tmp_path)], "neither an index nor a folder of indexes"),
                       ([], "no vqa-search index")):
        done = runner.invoke(cli, ["serve", *args])
        assert done.exit_code == 2 and says in done.stderr and done.stderr.count("\n") == 1, done.output
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        done = runner.invoke(cli, ["serve", "--index", str(serve_world), "--port", str(taken.getsockname()[1])])
        assert done.exit_code == 2 and "cannot listen" in done.stderr, done.output
    finally:
        taken.close()


def test_another_host_needs_a_token_and_gets_a_warning():
    assert check_binding("127.0.0.1", None) is None and check_binding("::1", None) is None
    assert check_binding("localhost", None) is None
    assert "token" in check_binding("0.0.0.0", "t")


def test_the_command_serves_until_stopped(serve_world):
    """A real `vqa-search serve` in a process of its own, on a port the system picks."""
    env = {**os.environ, "VQA_SEARCH_TOKEN": "tok", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vqa_search.cli", "serve", "--index", str(serve_world),
                                "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1)
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if _get(f"{base}/api/health")[0]["ready"]:
                    break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(f"{base}/api/indexes/shapes/search?q=a%20red%20circle&k=3",
                                         headers={"Authorization": "Bearer tok"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())["results"]) == 3
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/indexes", timeout=60)
        assert refused.value.code == 401
    finally:
        process.terminate()
        process.wait(30)


def test_connections_send_small_writes_at_once():
    """uvicorn answers with two writes (head, body); with Nagle on, the body of every keep-alive
    response waited for the client's delayed ACK (40 ms). asyncio turns Nagle off per connection, but
    only when the listening socket says IPPROTO_TCP."""
    import asyncio

    from vqa_search.serve.run import listen

    async def nodelay_of_an_accepted_connection() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Record, sock=listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0

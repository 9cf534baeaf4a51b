"""`vqa-search serve`'s API through FastAPI's TestClient: every endpoint, the same JSON as the command
line, and every client mistake a 4xx with one JSON line (never a 500, never a traceback)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from vqa_search.cli import app as cli
from vqa_search.core.images import MAX_PIXELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
TOKEN = "s3cret-token"


def _app(world, **config):
    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    return create_app(build_server([world], **config), warm_in_background=False)


@pytest.fixture(scope="module")
def client(serve_world):
    from fastapi.testclient import TestClient

    with TestClient(_app(serve_world, head=serve_world / "head.safetensors")) as test_client:
        yield test_client


def _cli_json(*args) -> dict:
    done = runner.invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def _rounded(data, digits: int = 4):
    """JSON with its floats rounded, to compare a server's answer with the command line's."""
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {key: _rounded(value, digits) for key, value in data.items()}
    if isinstance(data, list):
        return [_rounded(value, digits) for value in data]
    return data


def _png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _is_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"] and "\n" not in body["error"]
    return body["error"]


def test_health_indexes_and_info(client, serve_world):
    health = client.get("/api/health").json()
    assert health["ready"] and health["indexes"] == ["shapes"] and health["head"]
    listed = client.get("/api/indexes").json()
    assert listed["default"] == "shapes" and listed["indexes"][0]["images"] == 40
    assert client.get("/api/indexes/shapes").json() == _cli_json("info", str(serve_world))


def test_health_is_503_until_the_model_is_loaded(serve_world):
    from fastapi.testclient import TestClient

    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    server = build_server([serve_world])
    with TestClient(create_app(server, warm_in_background=False)) as started:
        server.ready.clear()  # as it is while the warm-up thread loads the model
        assert started.get("/api/health").status_code == 503
        assert "still loading" in _is_error(started.get("/api/indexes/shapes/search", params={"q": "x"}), 503)
        server.ready.set()
        assert started.get("/api/health").json()["status"] == "ready"


@pytest.mark.parametrize("params, cli_args", [
    ({"q": "a red circle", "k": 5}, ["a red circle", "-k", "5"]),
    ({"q": "two squares", "k": 4, "target": "captions"}, ["two squares", "-k", "4", "--target", "captions"]),
    ({"q": "a blue star", "k": 6, "rerank": True, "rerank_top": 8, "explain": True},
     ["a blue star", "-k", "6", "--rerank", "--rerank-top", "8", "--explain"]),
])
def test_text_search_is_query_json(client, serve_world, params, cli_args):
    response = client.get("/api/indexes/shapes/search", params=params)
    assert response.status_code == 200 and response.headers["x-index-generation"] == "1"
    assert _rounded(response.json()) == _rounded(_cli_json("query", *cli_args, "--index", str(serve_world)))


def test_explain_gives_each_word_a_box(client):
    hits = client.get("/api/indexes/shapes/search",
                      params={"q": "a red circle", "rerank": True, "explain": True, "k": 2}).json()["results"]
    words = hits[0]["explanation"]
    assert [item["word"] for item in words] == ["a", "red", "circle"]
    assert all(len(item["box"]) == 4 and 0 < item["weight"] <= 1 for item in words)


def test_more_like_an_indexed_image_and_an_upload_find_it_first(client, serve_world):
    by_id = client.get("/api/indexes/shapes/search", params={"image_id": 13, "k": 3}).json()
    assert by_id["query"] == "shape_000013.png" and by_id["results"][0]["image_id"] == 13
    picture = serve_world / "Images" / "shape_000013.png"
    uploaded = client.post("/api/indexes/shapes/search", files={"image": ("mine.png", picture.read_bytes())},
                           data={"k": 3}).json()
    assert uploaded["query"] == "mine.png" and uploaded["results"][0]["image_id"] == 13
    cli = _cli_json("query", "--image", str(picture), "-k", "3", "--index", str(serve_world))
    assert [hit["image_id"] for hit in uploaded["results"]] == [hit["image_id"] for hit in cli["results"]]
    reranked = client.get("/api/indexes/shapes/search",
                          params={"image_id": 13, "k": 3, "target": "captions", "rerank": True}).json()
    assert len(reranked["results"]) == 3 and reranked["target"] == "captions"


def test_ask_by_id_and_by_upload_is_ask_json(client, serve_world, tmp_path):
    picture = serve_world / "Images" / "shape_000004.png"
    question = "what color is the circle?"
    head = ["--index", str(serve_world), "--head", str(serve_world / "head.safetensors")]
    expected = _cli_json("ask", str(picture), question, *head)
    by_id = client.post("/api/indexes/shapes/ask", data={"question": question, "image_id": 4}).json()
    assert _rounded(by_id) == _rounded({**expected, "image": "shape_000004.png"})
    assert by_id["captions"]["evidence"][0]["own"]

    outside = tmp_path / "q.png"  # not an indexed path: the evidence is its nearest images' captions
    outside.write_bytes(picture.read_bytes())
    expected = _cli_json("ask", str(outside), question, "--top", "2", *head)
    uploaded = client.post("/api/indexes/shapes/ask", data={"question": question, "top": 2},
                           files={"image": ("q.png", picture.read_bytes())}).json()
    assert _rounded(uploaded) == _rounded({**expected, "image": "q.png"})


def test_images_and_thumbnails_by_id_with_caching_headers(client, serve_world):
    original = (serve_world / "Images" / "shape_000007.png").read_bytes()
    image = client.get("/api/indexes/shapes/images/7")
    assert image.status_code == 200 and image.content == original
    assert image.headers["content-type"] == "image/png" and image.headers["etag"]
    assert "no-cache" in image.headers["cache-control"] and image.headers["x-content-type-options"] == "nosniff"
    assert client.get("/api/indexes/shapes/images/7", headers={"If-None-Match": image.headers["etag"]}).status_code == 304

    thumbnail = client.get("/api/indexes/shapes/thumbnails/7")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (32, 32)  # never enlarged
    kept = list((serve_world / ".vqa-search" / "thumbnails").rglob("*.jpg"))
    assert any(path.read_bytes() == thumbnail.content for path in kept)
    assert not list((serve_world / ".vqa-search" / "thumbnails").rglob("*.tmp"))
    again = client.get("/api/indexes/shapes/thumbnails/7", headers={"If-None-Match": thumbnail.headers["etag"]})
    assert again.status_code == 304


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>vqa-search</title>" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("http://www.w3.org/2000/svg", "")  # no CDN
    schema = client.get("/openapi.json").json()
    assert {"/api/indexes/{name}/search", "/api/indexes/{name}/ask", "/api/indexes/{name}/images/{image_id}",
            "/api/indexes/{name}/thumbnails/{image_id}", "/api/health", "/api/indexes"} <= set(schema["paths"])


@pytest.mark.parametrize("method, url, kwargs, status, says", [
    ("get", "/api/indexes/shapes/search", {"params": {"q": ""}}, 400, "empty"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "   "}}, 400, "empty"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "k": 0}}, 422, "k:"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "k": -3}}, 422, "k:"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "k": "many"}}, 422, "k:"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "target": "videos"}}, 422, "target"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "nprobe": 0}}, 422, "nprobe"),
    ("get", "/api/indexes/shapes/search", {"params": {}}, 400, "either"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "image_id": 1}}, 400, "either"),
    ("get", "/api/indexes/shapes/search", {"params": {"q": "x", "explain": True}}, 400, "rerank"),
    ("get", "/api/indexes/shapes/search", {"params": {"image_id": 1, "rerank": True}}, 400, "re-scores"),
    ("get", "/api/indexes/shapes/search", {"params": {"image_id": 40}}, 404, "no image 40"),
    ("get", "/api/indexes/nope/search", {"params": {"q": "x"}}, 404, "no index named 'nope'"),
    ("get", "/api/indexes/nope", {}, 404, "no index named"),
    ("get", "/api/indexes/shapes/images/40", {}, 404, "no image 40"),
    ("get", "/api/indexes/shapes/images/99999999999999999999", {}, 404, "no image"),
    ("get", "/api/indexes/shapes/images/-1", {}, 422, "image_id"),
    ("get", "/api/indexes/shapes/thumbnails/abc", {}, 422, "image_id"),
    ("get", "/api/nothing-here", {}, 404, "Not Found"),
    ("delete", "/api/indexes/shapes/images/1", {}, 405, "Method Not Allowed"),
    ("post", "/api/indexes/shapes/search", {}, 422, "image"),
    ("post", "/api/indexes/shapes/search", {"files": {"image": ("a.png", b"not a picture")}}, 400,
     "cannot read query image a.png"),
    ("post", "/api/indexes/shapes/search", {"files": {"image": ("e.png", b"")}}, 400, "empty file"),
    ("post", "/api/indexes/shapes/ask", {"data": {"question": "what?"}}, 400, "either"),
    ("post", "/api/indexes/shapes/ask", {"data": {"question": "  ", "image_id": 1}}, 400, "empty"),
    ("post", "/api/indexes/shapes/ask", {"data": {"question": "what?", "image_id": 77}}, 404, "no image 77"),
    ("post", "/api/indexes/shapes/ask", {"data": {"question": "what?", "image_id": 1, "top": 0}}, 422, "top"),
    ("post", "/api/indexes/shapes/ask", {"data": {"question": "what?"}, "files": {"image": ("t.txt", b"hello")}},
     400, "cannot read"),
])
def test_client_mistakes_are_one_json_line(client, method, url, kwargs, status, says):
    assert says in _is_error(getattr(client, method)(url, **kwargs), status)


def test_uploads_too_large_or_bombs_are_refused(serve_world):
    from fastapi.testclient import TestClient

    with TestClient(_app(serve_world, max_upload_bytes=4096)) as small:
        big = _png((400, 400)) + b"\0" * 5000
        assert "larger than" in _is_error(small.post("/api/indexes/shapes/search", files={"image": ("b.png", big)}),
                                          413)
    side = int(MAX_PIXELS ** 0.5) + 100  # a PNG that says it is bigger than PIL's bomb limit: small on disk
    bomb = io.BytesIO()
    Image.new("1", (side, side)).save(bomb, "PNG")
    with TestClient(_app(serve_world)) as normal:
        message = _is_error(normal.post("/api/indexes/shapes/search", files={"image": ("bomb.png", bomb.getvalue())}),
                            400)
        assert "decompression bomb" in message and "/tmp" not in message


def test_a_token_is_required_when_set(serve_world, monkeypatch):
    from fastapi.testclient import TestClient

    with TestClient(_app(serve_world, token=TOKEN)) as guarded:
        for url in ("/api/indexes", "/api/indexes/shapes", "/api/indexes/shapes/search?q=x",
                    "/api/indexes/shapes/images/1", "/api/indexes/shapes/thumbnails/1"):
            response = guarded.get(url)
            assert "token" in _is_error(response, 401) and response.headers["www-authenticate"] == "Bearer"
            assert guarded.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert guarded.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        _is_error(guarded.post("/api/indexes/shapes/ask", data={"question": "q", "image_id": 1}), 401)
        guarded.cookies.set("vqa_search_token", TOKEN)  # what the page sets, so that <img> loads carry it
        assert guarded.get("/api/indexes/shapes/thumbnails/1").status_code == 200
        guarded.cookies.clear()
        assert guarded.get("/api/health").status_code == 200  # says only whether it is ready
        assert guarded.get("/").status_code == 200  # the page, which then asks for the token


def test_cors_is_off_unless_asked(serve_world):
    from fastapi.testclient import TestClient

    origin = {"Origin": "http://example.test"}
    with TestClient(_app(serve_world)) as closed:
        assert "access-control-allow-origin" not in closed.get("/api/indexes", headers=origin).headers
    with TestClient(_app(serve_world, cors=["http://example.test"])) as open_:
        assert open_.get("/api/indexes", headers=origin).headers["access-control-allow-origin"] == "http://example.test"
        assert "access-control-allow-origin" not in open_.get(
            "/api/indexes", headers={"Origin": "http://elsewhere.test"}).headers


def test_several_indexes_chosen_per_request(serve_world, tmp_path):
    from fastapi.testclient import TestClient

    from conftest import photos_folder, tiny_config

    from vqa_search.indexer.build import BuildConfig, build_index

    other = photos_folder(tmp_path / "many" / "photos")
    build_index(other, BuildConfig(**tiny_config()))
    (tmp_path / "many" / "shapes").symlink_to(serve_world)
    with TestClient(_app(tmp_path / "many")) as both:
        listed = both.get("/api/indexes").json()
        assert [item["name"] for item in listed["indexes"]] == ["photos", "shapes"]
        assert both.get("/api/indexes/photos/search", params={"q": "a picture", "k": 50}).json()["results"][0][
            "image"].startswith("photo_")
        assert len(both.get("/api/indexes/shapes/search", params={"q": "x", "k": 50}).json()["results"]) == 40

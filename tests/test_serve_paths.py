"""Nothing but indexed pictures leaves the server: ids, never paths; and the bytes served are the bytes
that were indexed, whatever was done to the folder since (traversal in any encoding, symlinks out of
the collection, files swapped after indexing, FIFOs)."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import photos_folder, tiny_config, write_photo
from vqa_search.indexer.build import BuildConfig, build_index

SECRET = "root:x:0:0:TOP-SECRET-LINE"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _world(tmp_path):
    """photos with a link to a secret text file and a link to a real picture outside the folder, indexed."""
    root = photos_folder(tmp_path / "photos")
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    outside_picture = write_photo(tmp_path / "outside" / "picture.png", (10, 200, 10))
    (root / "Images" / "evil.png").symlink_to(secret)
    (root / "Images" / "linked.png").symlink_to(outside_picture)
    build_index(root, BuildConfig(**tiny_config()))
    return root, secret


def _client(root):
    from fastapi.testclient import TestClient

    from vqa_search.serve import create_app
    from vqa_search.serve.run import build_server

    return TestClient(create_app(build_server([root]), warm_in_background=False))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Read-only tests share one world; the test that swaps files makes its own."""
    with _client(_world(tmp_path_factory.mktemp("paths"))[0]) as test_client:
        yield test_client


@pytest.fixture
def world(tmp_path):
    return _world(tmp_path)


def _ids(client) -> dict[str, int]:
    hits = client.get("/api/indexes/photos/search", params={"q": "a picture", "k": 100}).json()["results"]
    return {hit["image"]: hit["image_id"] for hit in hits}


def _refused(response) -> None:
    assert 400 <= response.status_code < 500, response.text
    assert "TOP-SECRET" not in response.text and "root:x" not in response.text


TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "..%252F..%252Fetc%252Fpasswd",
              "%2e%2e/%2e%2e/etc/passwd", "%252e%252e%252f%252e%252e%252fetc%252fpasswd", "....//....//etc/passwd",
              "%2Fetc%2Fpasswd", "1%2F..%2F..%2Fetc%2Fpasswd", "0/../../../../etc/passwd", "..\\..\\etc\\passwd"]


@pytest.mark.parametrize("attempt", TRAVERSALS)
@pytest.mark.parametrize("where", ["/api/indexes/photos/images/{}", "/api/indexes/photos/thumbnails/{}",
                                   "/api/indexes/{}/images/0", "/static/{}", "/{}"])
def test_traversal_in_any_encoding_serves_nothing(client, where, attempt):
    response = client.get(where.format(attempt))
    assert response.status_code in (404, 405, 422) or response.status_code == 200 and "<title>vqa-search" in response.text
    assert "root:x" not in response.text and "TOP-SECRET" not in response.text


def test_a_link_to_a_non_image_outside_is_never_indexed_so_never_served(client):
    ids = _ids(client)
    assert "evil.png" not in ids and "linked.png" in ids and len(ids) == 7
    for image_id in range(len(ids) + 2):
        for kind in ("images", "thumbnails"):
            response = client.get(f"/api/indexes/photos/{kind}/{image_id}")
            assert "TOP-SECRET" not in response.text


def test_a_picture_swapped_after_indexing_is_refused(world, tmp_path):
    root, secret = world
    with _client(root) as client:
        _swapped_pictures_are_refused(client, root, secret, tmp_path)


def _swapped_pictures_are_refused(client, root, secret, tmp_path):
    ids = _ids(client)
    linked = root / "Images" / "linked.png"
    served = client.get(f"/api/indexes/photos/images/{ids['linked.png']}")
    assert served.status_code == 200 and served.content == linked.read_bytes()  # an indexed picture, as indexed

    linked.unlink()
    linked.symlink_to(secret)  # the link now points at the secret
    photo = root / "Images" / "photo_1.png"
    photo.unlink()
    photo.symlink_to(secret)  # and a regular picture became a link to it
    fifo = root / "Images" / "photo_2.png"
    fifo.unlink()
    os.mkfifo(fifo)  # would block a naive open()
    replaced = root / "Images" / "photo_3.png"
    shutil.copy(tmp_path / "outside" / "picture.png", replaced)  # another picture under the same name

    for name in ("linked.png", "photo_1.png", "photo_2.png", "photo_3.png"):
        for kind in ("images", "thumbnails"):
            response = client.get(f"/api/indexes/photos/{kind}/{ids[name]}")
            _refused(response)
            assert response.status_code == 404 and "re-index" in response.json()["error"]
    assert client.get(f"/api/indexes/photos/images/{ids['photo_4.png']}").status_code == 200


def test_no_endpoint_takes_a_path(client):
    schema = client.get("/openapi.json").json()
    names = {parameter["name"] for operation in schema["paths"].values() for method in operation.values()
             for parameter in method.get("parameters", [])}
    assert names <= {"name", "image_id", "q", "target", "k", "nprobe", "rerank", "rerank_top", "explain"}


def test_a_read_only_index_still_serves_thumbnails(world, monkeypatch, our_log):
    import errno

    from vqa_search.serve import files

    def refused(target):
        raise OSError(errno.EROFS, "Read-only file system", str(target))

    monkeypatch.setattr(files, "atomic_path", refused)
    with _client(world[0]) as client:
        for image_id in (0, 1):
            response = client.get(f"/api/indexes/photos/thumbnails/{image_id}")
            assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert not (world[0] / ".vqa-search" / "thumbnails").exists()
    assert len({id(record) for record in our_log.records if "thumbnails are not kept" in record.message}) == 1

"""`vqa-search serve`: the library over HTTP, with the model and the indexes kept warm, and a web page.

The app layer, beside cli.py: it imports the library below it and adds no search logic of its own.
`state.py` holds what a server keeps (indexes that follow their generations, one CLIP per weights,
the answer head); `files.py` serves indexed images and thumbnails by id; `app.py` is the FastAPI app
(routes, errors, token, CORS) and `static/` the page. Importing this package imports no FastAPI or
torch: `create_app` and `run` import them when called.
"""

from __future__ import annotations

from vqa_search.serve.state import ServeConfig, Server, discover_indexes

__all__ = ["ServeConfig", "Server", "discover_indexes", "create_app"]


def create_app(server: Server, warm_in_background: bool = True):
    from vqa_search.serve.app import create_app as create

    return create(server, warm_in_background)

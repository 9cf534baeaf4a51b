"""The FastAPI app of `vqa-search serve`: routes over the library, errors as one JSON line, the token, CORS.

Every answer is the JSON the command line prints: search is `query --json` (`Index.search`, or
`QueryReranker.search` with re-ranking), ask is `ask --json` (`vqa.ask.ask_loaded`), an index's
description is `info --json` (`align.info.index_info`). Client mistakes are 4xx with
`{"error": "one line"}`; an unexpected failure is a 500 whose body says only that, the traceback
goes to the server's log.
"""

from __future__ import annotations

import hmac
import logging
import re
import shutil
import tempfile
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from threading import Thread
from typing import Annotated, Iterator, Literal, Optional

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vqa_search import __version__
from vqa_search.core.errors import UserError
from vqa_search.serve.files import etag_of, indexed_bytes, thumbnail_bytes
from vqa_search.serve.state import ApiError, Served, Server
from vqa_search.vqa.constants import DEFAULT_TOP_ANSWERS

log = logging.getLogger("vqa_search")

MAX_K = 1000
TOKEN_COOKIE = "vqa_search_token"
CACHE_CONTROL = "private, no-cache"  # revalidate by ETag: an id names another picture after a re-index
UPLOAD_CHUNK = 1 << 20
OPEN_PATHS = ("/api/health",)  # answered without the token: says only whether the server is ready
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}")


class ErrorBody(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422, 503)}
ImageId = Annotated[int, PathParameter(ge=0, description="Image id in the index's live generation.")]
Target = Literal["images", "captions"]
IndexName = Annotated[str, PathParameter(description="Index name, as GET /api/indexes lists them.", max_length=200)]


def _static() -> Path:
    return Path(str(resources.files("vqa_search.serve") / "static"))


def create_app(server: Server, warm_in_background: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warm_in_background:
            Thread(target=server.warm, name="vqa-search-warm", daemon=True).start()
        else:
            server.warm()
        yield

    app = FastAPI(title="vqa-search", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: the schema is /openapi.json
                  description="Search an indexed photo collection by text or example image, ask questions "
                              "about its pictures, and fetch them by id. Errors are `{\"error\": \"...\"}`.")
    app.state.server = server
    _errors(app)
    _security(app, server)
    _routes(app, server)
    app.mount("/static", StaticFiles(directory=_static()), name="static")
    _name_choices(app, list(server.indexes))
    return app


def _name_choices(app: FastAPI, names: list[str]) -> None:
    """The schema lists this server's index names, so a client (or a fuzzer) knows which exist."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operation in (op for item in generate()["paths"].values() for op in item.values()):
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "path" and parameter["name"] == "name":
                        parameter["schema"]["enum"] = names
        return app.openapi_schema

    app.openapi = openapi


# ---- errors --------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return _error(error.status, str(error))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, error: UserError):
        return _error(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("query", "path", "body"))
            problems.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
        return _error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _error(500, "internal error (the server's log has the details)")


# ---- token, CORS, upload size --------------------------------------------------------------------


def _security(app: FastAPI, server: Server) -> None:
    config = server.config

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if request.method == "OPTIONS":  # a CORS preflight carries no credentials
            return await call_next(request)
        if config.token and path.startswith("/api/") and path not in OPEN_PATHS:
            given = request.cookies.get(TOKEN_COOKIE, "")
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
            if not hmac.compare_digest(given.encode(), config.token.encode()):
                return _error(401, "this server needs its token: send 'Authorization: Bearer TOKEN'",
                              {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_upload_bytes + (1 << 16):
            return _error(413, f"the request is larger than the {config.max_upload_bytes} bytes an upload may have")
        return await call_next(request)

    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False,
                           expose_headers=["ETag", "X-Index-Generation"])


@contextmanager
def _uploaded(upload: UploadFile, limit: int) -> Iterator[tuple[Path, str]]:
    """The upload in a private temporary file (the library reads images by path), and the name to show.
    A UserError naming the temporary file names the upload instead."""
    shown = Path(upload.filename or "").name[:200] or "uploaded image"
    suffix = Path(shown).suffix
    folder = Path(tempfile.mkdtemp(prefix="vqa-search-upload-"))
    path = folder / ("upload" + (suffix if _SUFFIX.fullmatch(suffix) else ""))
    try:
        size = 0
        with open(path, "wb") as out:
            while chunk := upload.file.read(UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the image is larger than {limit} bytes")
                out.write(chunk)
        try:
            yield path, shown
        except UserError as error:
            raise UserError(str(error).replace(str(path), shown)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _generation_header(served: Served) -> dict:
    return {"X-Index-Generation": str(served.generation)}


def _not_modified(request: Request, etag: str) -> bool:
    return etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]


def _cached(request: Request, etag: str, content, served: Served) -> Response:
    """`content` is called only when the client's copy (If-None-Match) is not the current one."""
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff",
               **_generation_header(served)}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    data, media_type = content()
    return Response(data, media_type=media_type, headers=headers)


# ---- routes --------------------------------------------------------------------------------------


def _routes(app: FastAPI, server: Server) -> None:
    config = server.config

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(_static() / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health", tags=["server"], responses={503: {"model": ErrorBody}})
    def health() -> dict:
        """Ready once every index's generation and model (and the answer head) are loaded; 503 before."""
        status = "failed" if server.failure else "ready" if server.ready.is_set() else "loading"
        body = {"status": status, "ready": status == "ready", "version": __version__,
                "indexes": list(server.indexes), "default": server.default, "head": config.head is not None}
        if server.failure:
            body["error"] = server.failure
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/api/indexes", tags=["indexes"], responses=ERRORS)
    def indexes() -> dict:
        """The indexes this server answers for, each with its live generation and counts."""
        listed = []
        for name, live in server.indexes.items():
            served = live.current()
            listed.append({"name": name, "generation": served.generation,
                           "images": len(served.index.image_paths), "captions": len(served.index.caption_texts),
                           "model": served.index.identity.to_json()})
        return {"default": server.default, "indexes": listed, "head": config.head is not None}

    @app.get("/api/indexes/{name}", tags=["indexes"], responses=ERRORS)
    def info(name: IndexName) -> dict:
        """What `vqa-search info --json` shows for the index: model, counts, disk, generations, region sets,
        re-ranker."""
        from vqa_search.align.info import index_info

        return index_info(server.live(name).path).to_json()

    @app.get("/api/indexes/{name}/search", tags=["search"], responses=ERRORS)
    def search(
        name: IndexName,
        q: Annotated[Optional[str], Query(description="Query text.", max_length=2000)] = None,
        image_id: Annotated[Optional[int], Query(ge=0, description="More like this indexed image.")] = None,
        target: Target = "images",
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        nprobe: Annotated[Optional[int], Query(ge=1, le=1 << 16)] = None,
        rerank: bool = False,
        rerank_top: Annotated[Optional[int], Query(ge=1, le=MAX_K)] = None,
        explain: bool = False,
    ):
        """Search by text (`q`) or by an indexed image (`image_id`): `query --json`'s result."""
        if (q is None) == (image_id is None):
            raise ApiError(400, "give either q (a text) or image_id (more like an indexed image), not both")
        server.require_ready()
        served = server.live(name).current()
        image = None
        if image_id is not None:
            served.check_image_id(image_id)
            if not rerank:  # its stored vector: no need to read or embed the picture again
                vector = np.asarray(served.index.embeddings("images")[image_id:image_id + 1], dtype=np.float32)
                # no model forward, so no wait for the compute lock (FAISS searches may run side by side):
                # under 8 clients this answered in 470 ms behind the text forwards instead of 7 ms
                result = served.index.search_vector(vector, served.index.image_paths[image_id], k, target, nprobe)
                return JSONResponse(result.to_json(), headers=_generation_header(served))
            image = served.index.image_file(image_id)
        result = _search(served, q, image, k, target, nprobe, rerank, rerank_top, explain)
        if image_id is not None:
            result.query = served.index.image_paths[image_id]
        return JSONResponse(result.to_json(), headers=_generation_header(served))

    @app.post("/api/indexes/{name}/search", tags=["search"], responses=ERRORS)
    def search_by_upload(
        name: IndexName,
        image: Annotated[UploadFile, File(description="The query picture.")],
        target: Annotated[Target, Form()] = "images",
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        nprobe: Annotated[Optional[int], Form(ge=1, le=1 << 16)] = None,
        rerank: Annotated[bool, Form()] = False,
        rerank_top: Annotated[Optional[int], Form(ge=1, le=MAX_K)] = None,
        explain: Annotated[bool, Form()] = False,
    ):
        """Search with an uploaded picture: `query --image FILE --json`'s result."""
        server.require_ready()
        served = server.live(name).current()
        with _uploaded(image, config.max_upload_bytes) as (path, shown):
            result = _search(served, None, path, k, target, nprobe, rerank, rerank_top, explain)
        result.query = shown
        return JSONResponse(result.to_json(), headers=_generation_header(served))

    def _search(served: Served, text, image, k, target, nprobe, rerank, rerank_top, explain):
        if explain and not rerank:
            raise ApiError(400, "explain shows what the re-ranker attended to: set rerank=true too")
        with server.compute:
            if rerank:
                return served.reranker().search(text=text, image=image, k=k, target=target, nprobe=nprobe,
                                                explain=explain, top=rerank_top)
            return served.index.search(text=text, image=image, k=k, target=target, nprobe=nprobe)

    @app.post("/api/indexes/{name}/ask", tags=["ask"], responses=ERRORS)
    def ask(
        name: IndexName,
        question: Annotated[str, Form(max_length=1000)],
        image_id: Annotated[Optional[int], Form(ge=0, description="An indexed picture...")] = None,
        image: Annotated[Optional[UploadFile], File(description="...or an uploaded one.")] = None,
        top: Annotated[int, Form(ge=1, le=100)] = DEFAULT_TOP_ANSWERS,
    ):
        """A question about a picture: the head's answers (with --head) and the captions' evidence,
        `ask --json`'s result."""
        from vqa_search.vqa.ask import ask_loaded

        if (image is None) == (image_id is None):
            raise ApiError(400, "give either image_id (an indexed picture) or an uploaded image, not both")
        if not question.strip():
            raise ApiError(400, "the question is empty")
        server.require_ready()
        served = server.live(name).current()
        captions = served.captions(required=server.answerer is None)
        if image_id is not None:
            served.check_image_id(image_id)
            with server.compute:
                result = ask_loaded(served.index.image_file(image_id), question, server.answerer, captions, top,
                                    shown_as=served.index.image_paths[image_id])
        else:
            with _uploaded(image, config.max_upload_bytes) as (path, shown), server.compute:
                result = ask_loaded(path, question, server.answerer, captions, top, shown_as=shown)
        return JSONResponse(result.to_json(), headers=_generation_header(served))

    @app.get("/api/indexes/{name}/images/{image_id}", tags=["images"], responses=ERRORS,
             response_class=Response)
    def image(request: Request, name: IndexName, image_id: ImageId):
        """The indexed picture, byte for byte as indexed (refused if it changed on disk since)."""
        served = server.live(name).current()
        return _cached(request, etag_of(served, image_id), lambda: indexed_bytes(served, image_id), served)

    @app.get("/api/indexes/{name}/thumbnails/{image_id}", tags=["images"], responses=ERRORS,
             response_class=Response)
    def thumbnail(request: Request, name: IndexName, image_id: ImageId):
        """A JPEG of the picture, at most 256 pixels on its longest side; made once, kept under the index."""
        served = server.live(name).current()
        return _cached(request, etag_of(served, image_id, f"-{config.thumbnail_size}"),
                       lambda: (thumbnail_bytes(served, image_id, config.thumbnail_size), "image/jpeg"), served)

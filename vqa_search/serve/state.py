"""What a server keeps between requests: its indexes, each following its committed generation, one
CLIP per set of weights, the re-rankers and caption answerers of each generation, the answer head.

A request takes the generation that is live when it starts (`LiveIndex.current`) and keeps that
`Served` object to its end, so a commit in the meantime never changes what it reads; the next
request opens the new generation. The store keeps the previous generation for one more commit
(core/store.py), which is what lets the request in flight finish.

No torch, FastAPI or FAISS at import: the CLI imports this module to check its arguments.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from vqa_search.align.constants import DEFAULT_TOP
from vqa_search.core.errors import UserError
from vqa_search.core.identity import ModelIdentity
from vqa_search.core.store import DEFAULT_DIR_NAME, IndexDir
from vqa_search.retrieval.searcher import Index, find_index

log = logging.getLogger("vqa_search")

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an uploaded query image; decoding still refuses bombs (core/images.py)
THUMBNAIL_SIZE = 256  # longest side, pixels
THUMBNAIL_DIR = "thumbnails"  # INDEX_DIR/<this>/: JPEGs named by the image's content hash
LOOPBACK_NAMES = ("localhost",)
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class ApiError(Exception):
    """A client error with its HTTP status; str() is the one line the client reads."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServeConfig:
    indexes: list[Path]  # index directories, as `discover_indexes` found them
    reranker: Path | None = None  # every index's re-ranker; default INDEX/reranker.safetensors
    head: Path | None = None  # answer head for `ask`
    token: str | None = None  # bearer token every /api request but health must carry
    cors: list[str] = field(default_factory=list)  # allowed origins; none: CORS off
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    thumbnail_size: int = THUMBNAIL_SIZE
    rerank_top: int = DEFAULT_TOP


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> str | None:
    """None for loopback; a warning to print for another host with a token; a UserError without one."""
    if is_loopback(host):
        return None
    if not token:
        raise UserError(f"serving on {host} lets other machines search your photos: pass --token T (or set "
                        "VQA_SEARCH_TOKEN), or keep the default --host 127.0.0.1")
    return (f"serving on {host}: any machine that can reach it and knows the token can search these photos "
            "(plain HTTP: put a TLS proxy in front of it on an untrusted network)")


def discover_indexes(paths: list[Path] | None) -> dict[str, Path]:
    """name -> index directory. Each path is an index (or a dataset folder holding one) or a folder of
    them; no path: the index found from the current folder upwards, as `query` does."""
    found: list[Path] = []
    if not paths:
        found.append(Path(find_index(None, upwards=True)))
    for path in paths or []:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"--index {path}: no such folder")
        try:
            found.append(Path(find_index(path, upwards=False)))
            continue
        except UserError:
            pass
        children = []
        for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name != DEFAULT_DIR_NAME):
            try:
                children.append(Path(find_index(child, upwards=False)))
            except UserError:
                continue
        if not children:
            raise UserError(f"--index {path}: neither an index nor a folder of indexes (run `vqa-search index "
                            "DATASET` first)")
        found += children
    named: dict[str, Path] = {}
    for index_dir in found:
        index_dir = index_dir.resolve()
        if index_dir in named.values():
            continue
        base = _NAME.sub("-", (index_dir.parent if index_dir.name == DEFAULT_DIR_NAME else index_dir).name)
        base = base.strip("-.") or "index"
        name, number = base, 2
        while name in named:
            name, number = f"{base}-{number}", number + 1
        named[name] = index_dir
    return named


def _weights_key(identity: ModelIdentity) -> tuple[str, str]:
    """Same key, same weights (ModelIdentity.same_weights): files by content, tags by name."""
    return identity.model, identity.sha256 or identity.pretrained


class Served:
    """One committed generation of one index, with what answers queries on it (built when first asked)."""

    def __init__(self, name: str, index: Index, server: "Server"):
        self.name, self.index, self.server = name, index, server
        self.generation: int = index.manifest["generation"]
        self._lock = threading.Lock()
        self._reranker = None
        self._captions = None

    def reranker(self):
        """The QueryReranker of this generation: --reranker FILE, else INDEX/reranker.safetensors."""
        with self._lock:
            if self._reranker is None:
                from vqa_search.align.rerank import QueryReranker

                self._reranker = QueryReranker(self.index, self.server.config.reranker, self.server.config.rerank_top)
            return self._reranker

    def captions(self, required: bool = True):
        """The CaptionAnswerer of this generation; None when the index has none and `required` is False."""
        with self._lock:
            if self._captions is None:
                if not self.index.caption_texts and not required:
                    return None
                from vqa_search.vqa.captions import CaptionAnswerer

                self._captions = CaptionAnswerer(self.index)
            return self._captions

    def check_image_id(self, image_id: int) -> None:
        if not 0 <= image_id < len(self.index.image_paths):
            raise ApiError(404, f"no image {image_id} in index {self.name!r} (generation {self.generation} "
                                f"holds ids 0..{len(self.index.image_paths) - 1})")


class LiveIndex:
    """An index directory followed across commits: `current()` is the generation live now."""

    def __init__(self, name: str, path: Path, server: "Server"):
        self.name, self.path, self.server = name, Path(path), server
        self.dir = IndexDir(self.path)
        self._lock = threading.Lock()
        self._served: Served | None = None
        self._stamp: tuple | None = None

    def _manifest_stamp(self) -> tuple:
        """The manifest is replaced by a rename on every commit: a new inode, size or time is a new generation."""
        try:
            stat = os.stat(self.dir.manifest_path)
        except OSError:
            raise ApiError(503, f"index {self.name!r} is not available: {self.dir.manifest_path} is gone") from None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def current(self) -> Served:
        stamp = self._manifest_stamp()
        with self._lock:
            if self._served is None or stamp != self._stamp:
                previous = self._served
                self._served = Served(self.name, self.server.open_index(self.dir), self.server)
                self._stamp = stamp
                if previous is not None and previous.generation != self._served.generation:
                    log.info("index %s: generation %d is live (was %d)", self.name, self._served.generation,
                             previous.generation)
            return self._served


class Server:
    """Everything one `vqa-search serve` keeps warm."""

    def __init__(self, config: ServeConfig, names: dict[str, Path] | None = None):
        self.config = config
        names = names if names is not None else discover_indexes(config.indexes)
        self.indexes = {name: LiveIndex(name, path, self) for name, path in names.items()}
        self.default = next(iter(self.indexes))
        self.compute = threading.Lock()  # one model forward at a time: torch already uses every core for it
        self._clips: dict[tuple[str, str], object] = {}
        self._clip_lock = threading.Lock()
        self.answerer = None
        self.ready = threading.Event()
        self.failure: str | None = None

    def live(self, name: str | None) -> LiveIndex:
        name = name or self.default
        if name not in self.indexes:
            raise ApiError(404, f"no index named {name!r}; this server has {', '.join(self.indexes)}")
        return self.indexes[name]

    def open_index(self, index_dir: IndexDir) -> Index:
        """The generation live now, with the CLIP already loaded for its weights (loaded now if new)."""
        try:
            key = _weights_key(ModelIdentity.from_json(index_dir.read_manifest()["model"]))
            with self._clip_lock:  # held for long only while a new model loads
                index = Index(index_dir, clip=self._clips.get(key))
                if _weights_key(index.identity) != key:  # re-embedded between the two reads
                    index = Index(index_dir, clip=self._clips.get(_weights_key(index.identity)))
                self._clips.setdefault(_weights_key(index.identity), index.clip)  # checks and loads if new
        except UserError as error:
            raise ApiError(503, str(error)) from None
        return index

    def warm(self) -> None:
        """Load every index's generation and model (and the head) now, so the first query is fast."""
        try:
            for live in self.indexes.values():
                live.current()
            if self.config.head is not None:
                from vqa_search.vqa.answerer import load_answerer

                self.answerer = load_answerer(self.config.head)
        except (UserError, ApiError, OSError) as error:
            self.failure = str(error)
            log.error("the server cannot answer queries: %s", error)
            return
        self.ready.set()

    def require_ready(self) -> None:
        if self.failure:
            raise ApiError(503, f"the server cannot answer queries: {self.failure}")
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading; try again in a moment (GET /api/health says when)")

"""Export an index's vectors with their metadata as one .npz or .parquet file, for use elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqa_search.core.atomic import atomic_path
from vqa_search.core.errors import UserError
from vqa_search.retrieval.searcher import Index

FORMATS = (".npz", ".parquet")


def export_vectors(index: Index, out: Path | str) -> Path:
    """.npz: parallel arrays per kind. .parquet: one row per image or caption, `kind` tells which."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise UserError(f"cannot export to {out.name}: the file name must end in {' or '.join(FORMATS)}")
    with atomic_path(out) as temp:
        if out.suffix == ".npz":
            _write_npz(index, temp)
        else:
            pq.write_table(_table(index), temp)
    return out


def _write_npz(index: Index, path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(
            handle,
            image_ids=np.arange(len(index.image_paths), dtype=np.int64),
            image_paths=np.asarray(index.image_paths, dtype=np.str_),
            image_embeddings=np.asarray(index.embeddings("images")),
            caption_ids=np.arange(len(index.caption_texts), dtype=np.int64),
            caption_image_ids=index.caption_image,
            caption_texts=np.asarray(index.caption_texts, dtype=np.str_),
            caption_embeddings=np.asarray(index.embeddings("captions")),
        )


def _table(index: Index) -> pa.Table:
    n_images, n_captions = len(index.image_paths), len(index.caption_texts)
    dim = index.manifest["dim"]
    vectors = np.concatenate([index.embeddings("images"), index.embeddings("captions")]).astype(np.float32)
    image_ids = np.concatenate([np.arange(n_images), index.caption_image]).astype(np.int64)
    return pa.table(
        {
            "kind": ["image"] * n_images + ["caption"] * n_captions,
            "id": np.concatenate([np.arange(n_images), np.arange(n_captions)]).astype(np.int64),
            "image_id": image_ids,
            "path": [index.image_paths[i] for i in image_ids],
            "text": [None] * n_images + index.caption_texts,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        }
    )

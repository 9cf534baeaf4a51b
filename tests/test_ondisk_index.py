"""IVF-PQ with on-disk inverted lists: built block by block, searched memory-mapped, chosen for a budget."""

from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest
from conftest import tiny_config, write_photo
from typer.testing import CliRunner

from vqa_search import Index
from vqa_search.cli import app
from vqa_search.core import faiss_index as fi
from vqa_search.core.errors import UserError
from vqa_search.core.memory import parse_memory

DIM = 32


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """3,000 vectors in an .npy, an IVF-PQ trained on a sample, filled from the memory map in 4 blocks."""
    folder = tmp_path_factory.mktemp("ondisk")
    vectors = _clustered(3000)
    np.save(folder / "vectors.npy", vectors)
    spec = fi.IndexSpec("ivfpq-ondisk", nlist=16, nprobe=4, pq_bytes=8, refine=5)
    trained = fi.train_ondisk(vectors[::2], spec)
    path = fi.build_ondisk(fi.memory_mapped_blocks(folder / "vectors.npy", rows=800), spec, folder, "images",
                           trained=trained)
    return folder, vectors, spec, trained, path


def test_block_by_block_equals_adding_everything_at_once(built):
    folder, vectors, spec, trained, path = built
    in_memory = faiss.clone_index(trained)
    in_memory.add(vectors)
    on_disk = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    queries = _clustered(50, seed=1)
    for nprobe in (1, 4, 16):
        faiss.extract_index_ivf(in_memory).nprobe = faiss.extract_index_ivf(on_disk).nprobe = nprobe
        expected_scores, expected_ids = in_memory.search(queries, 10)
        scores, ids = on_disk.search(queries, 10)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)
    assert on_disk.ntotal == 3000
    assert sorted(p.name for p in folder.iterdir()) == ["images.faiss", "images.ivfdata", "vectors.npy"]  # blocks gone


def test_search_reads_the_lists_memory_mapped_and_rescores_exactly(built):
    folder, vectors, spec, _, path = built
    index = fi.read_faiss(path, spec=spec, vectors=folder / "vectors.npy")
    lists = faiss.extract_index_ivf(index.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    maps = open("/proc/self/maps").read()
    assert str(folder / "images.ivfdata") in maps and str(folder / "vectors.npy") in maps
    queries = _clustered(20, seed=2)
    index.nprobe = spec.nlist  # every list: the candidates are the PQ's top 50 of everything
    scores, ids = fi.search(index, queries, 10)
    _, candidates = index.index.search(queries, 50)
    for query, row_scores, row_ids, found in zip(queries, scores, ids, candidates):
        exact = vectors[found] @ query  # naive reference: score the candidates, sort
        order = np.argsort(-exact, kind="stable")[:10]
        np.testing.assert_array_equal(row_ids, found[order])
        np.testing.assert_allclose(row_scores, exact[order], rtol=1e-5)


def test_index_directory_can_move(built, tmp_path):
    folder, _, spec, _, path = built
    for name in ("images.faiss", "images.ivfdata", "vectors.npy"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    moved = fi.read_faiss(tmp_path / "images.faiss", spec=spec, vectors=tmp_path / "vectors.npy")
    original = fi.read_faiss(path, spec=spec, vectors=folder / "vectors.npy")
    queries = _clustered(5, seed=3)
    np.testing.assert_array_equal(fi.search(moved, queries, 10)[1], fi.search(original, queries, 10)[1])


def test_measured_build_tunes_nprobe_to_the_recall_target(tmp_path):
    vectors = _clustered(4000, seed=4)
    spec = fi.IndexSpec("ivfpq-ondisk", nlist=32, nprobe=1, pq_bytes=8, refine=10)
    built, seconds = fi.build_ondisk_measured(vectors, spec, tmp_path, "images")
    assert set(seconds) == {"train", "add_and_merge", "tune_nprobe"}
    assert built.recall_queries == fi.RECALL_QUERIES
    held = fi.held_out_rows(len(vectors))
    index = fi.RefinedIndex(faiss.read_index(str(tmp_path / "images.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR), vectors, 10)
    exact = vectors[held] @ vectors.T
    exact[np.arange(len(held)), held] = -np.inf  # the query itself earns nothing
    truth = np.argsort(-exact, axis=1)[:, :10]

    def recall(nprobe):
        index.nprobe = nprobe
        found = fi.search(index, vectors[held], 11)[1]
        return np.mean([len(set([i for i in f if i != q][:10]) & set(t)) / 10 for f, q, t in zip(found, held, truth)])

    assert recall(built.nprobe) == pytest.approx(built.recall_at_10, abs=1e-4)
    assert built.recall_at_10 >= fi.RECALL_TARGET or built.nprobe == spec.nlist // 4
    if built.nprobe > 1:  # the smallest power of two that reaches it
        assert recall(built.nprobe // 2) < fi.RECALL_TARGET


def _naive_budget_choice(n: int, dim: int, budget: int):
    """Every on-disk candidate, the largest PQ code whose memory fits: what choose_for_budget must pick."""
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    while nlist * 39 > n:
        nlist //= 2
    fitting = [m for m in range(1, dim // 8 + 1) if dim % m == 0 and m in fi.PQ_BYTE_CHOICES
               and n * (m + 8) + nlist * dim * 4 <= budget
               and min(n, 64 * nlist) * dim * 4 + nlist * dim * 4 <= budget // 2]
    return nlist, max(fitting, default=None)


@pytest.mark.parametrize("n", [5_000_000, 10_000_000, 100_000_000, 1_000_000_000])
@pytest.mark.parametrize("budget", ["512M", "1G", "4G", "16G", "64G"])
def test_budget_chooser_against_a_naive_reference(n, budget):
    nlist, pq_bytes = _naive_budget_choice(n, 512, parse_memory(budget))
    if pq_bytes is None:
        with pytest.raises(UserError, match="too small"):
            fi.choose_for_budget(n, 512, parse_memory(budget))
        return
    spec = fi.choose_for_budget(n, 512, parse_memory(budget))
    assert (spec.type, spec.nlist, spec.pq_bytes, spec.budget_bytes) == ("ivfpq-ondisk", nlist, pq_bytes,
                                                                        parse_memory(budget))


def test_budget_chooser_hand_cases():
    # 10M x 512: codes of 64 bytes + 8 of id = 720 MB, under 4G; 100M at 4G leaves 32 bytes a code
    assert fi.choose_for_budget(10_000_000, 512, 4 << 30).to_json() == {
        "type": "ivfpq-ondisk", "nlist": 4096, "nprobe": 256, "pq_bytes": 64, "refine": 30, "budget_bytes": 4 << 30}
    assert fi.choose_for_budget(100_000_000, 512, 4 << 30).pq_bytes == 32
    assert fi.choose_for_budget(1_000_000_000, 512, 16 << 30).pq_bytes == 8
    assert fi.choose_for_budget(20_000, 512, 4 << 30).type == "flat"  # fits and is fast: exact
    assert fi.choose_for_budget(1_000_000, 512, 4 << 30).type == "ivf"  # 2 GB of vectors fit 4G
    assert fi.choose_for_budget(1_000_000, 512, 1 << 30).type == "ivfpq-ondisk"  # they do not fit 1G
    assert fi.choose_for_budget(1_000_000, 512, 4 << 30, "ivfpq-ondisk").type == "ivfpq-ondisk"
    assert fi.choose_spec(3_000_000, "auto").type == "ivfpq-ondisk"
    with pytest.raises(UserError, match="too small for 100,000,000 vectors"):
        fi.choose_for_budget(100_000_000, 512, 100 << 20)
    with pytest.raises(UserError, match="leave --index-type auto"):
        fi.choose_for_budget(1000, 512, 1 << 30, "ivf")


@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512m", 512 << 20), ("1.5GiB", 3 << 29),
                                            ("1000", 1000), ("2TB", 2 << 40)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "four", "-1G", "0", "4X"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(UserError, match="--max-index-memory"):
        parse_memory(text)


# ---- through the index: the manifest, info, and a searcher across commits -----------------------------

def _many_photos(folder, count, start=0):
    for i in range(start, start + count):
        write_photo(folder / f"{i:03d}.png", tuple((i * 37 + c * 91) % 256 for c in range(3)))


def test_index_records_the_budget_choice_and_a_searcher_survives_two_commits(tmp_path, capfd):
    folder = tmp_path / "many"
    _many_photos(folder, 80)
    Index.build(folder, **tiny_config(index_type="ivfpq-ondisk", max_index_memory="64M"))
    manifest = json.loads((folder / ".vqa-search" / "manifest.json").read_text())
    spec = manifest["index"]["images"]
    assert manifest["index"]["max_memory"] == "64M"
    assert spec["type"] == "ivfpq-ondisk" and spec["budget_bytes"] == 64 << 20 and spec["refine"] == fi.REFINE_FACTOR
    assert spec["recall_queries"] == 16 and 0 <= spec["recall_at_10"] <= 1 and spec["nprobe"] >= 1
    gen = folder / ".vqa-search" / f"gen-{manifest['generation']:06d}"
    assert (gen / "images.ivfdata").is_file() and not list((folder / ".vqa-search").glob(".faiss-*"))

    searcher = Index.open(folder)
    query = searcher.embeddings("images")[5][None].copy()
    before = searcher.search_vector(query, "005", k=5)
    assert before.results[0].image == "005.png"
    (folder / ".vqa-search" / ".faiss-999999" / "block").mkdir(parents=True)  # as a killed build leaves it
    for late in (80, 81):  # two commits: the generation the searcher opened is deleted
        _many_photos(folder, 1, start=late)
        Index.build(folder, **tiny_config(index_type="ivfpq-ondisk", max_index_memory="64M"))
    assert not gen.exists() and not list((folder / ".vqa-search").glob(".faiss-*"))
    after = searcher.search_vector(query, "005", k=5)  # its .ivfdata and vectors stay mapped until it closes
    assert [hit.image for hit in after.results] == [hit.image for hit in before.results]
    assert len(Index.open(folder).image_paths) == 82
    assert capfd.readouterr().out == ""  # FAISS's printf about on-disk lists never reaches --json output


def test_info_shows_the_choice_and_its_recall(tmp_path):
    folder = tmp_path / "many"
    _many_photos(folder, 60)
    Index.build(folder, **tiny_config(index_type="ivfpq-ondisk", max_index_memory="64M"))
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("faiss images"))
    assert "ivfpq-ondisk, nlist 1, PQ 8 bytes, nprobe 1, top k×30 re-scored exactly" in line
    assert "chosen for --max-index-memory 64M" in line and "measured on 12 held-out vectors" in line
    data = json.loads(CliRunner().invoke(app, ["info", str(folder), "--json"]).stdout)
    assert data["index_params"]["images"]["budget_bytes"] == 64 << 20
    assert data["index_types"]["images"] == "ivfpq-ondisk"


def test_a_bad_budget_is_one_line_before_any_work(photos):
    result = CliRunner().invoke(app, ["index", str(photos), "--model", "vqa-tiny", "--pretrained", "none",
                                      "--max-index-memory", "lots"])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "--max-index-memory takes a size such as 4G" in result.stderr and "Traceback" not in result.output
    assert not (photos / ".vqa-search" / "pending").exists()


@pytest.mark.parametrize("nlist", [16, fi.HNSW_QUANTIZER_MIN_NLIST])
def test_a_search_s_nprobe_is_its_own(tmp_path, nlist):
    """A served index is shared: one request's nprobe must equal setting it, and must not stay."""
    vectors = _clustered(nlist * 2 if nlist > 16 else 3000, seed=5)
    spec = fi.IndexSpec("ivfpq-ondisk", nlist=nlist, nprobe=1, pq_bytes=8, refine=5)
    trained = fi.train_ondisk(vectors, spec)
    np.save(tmp_path / "vectors.npy", vectors)
    path = fi.build_ondisk(fi.memory_mapped_blocks(tmp_path / "vectors.npy", rows=len(vectors)), spec, tmp_path,
                           "images", trained=trained)
    index = fi.RefinedIndex(faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR), vectors, 5)
    queries = _clustered(20, seed=6)
    once = fi.search(index, queries, 10, nprobe=8)
    assert index.nprobe == 1
    index.nprobe = 8
    np.testing.assert_array_equal(fi.search(index, queries, 10)[1], once[1])

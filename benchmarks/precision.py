"""Backends and precisions against fp32 PyTorch, in one run: speed and faithfulness.

Per (backend, precision): images/s of the bare image forward (preprocessed pixels in memory, batches of
--batch-size; median of --rounds rounds that alternate the configurations, so a noisy neighbour hits
them all alike), captions/s, the latency of one text query (median of --queries, tokenizer included),
and faithfulness on the Flickr8k sample: the cosine of every image and caption embedding with the
fp32 PyTorch one (median and minimum), and the mean overlap of each caption's top-10 images with
fp32's. Then shapes-world test recall of a tiny CLIP trained here from scratch (target: R@1 within 0.5
of fp32). These numbers are what `core/inference.py`'s `auto` rule is made of.

    flock -x /tmp/cpu.lock python benchmarks/precision.py --json benchmarks/results/precision.json

ViT-B-32 with random weights costs what the pretrained one costs; its ONNX export is cached per user
(core/backends.py) and made before the clock starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqa_search.core.encode import encode_image_batch, encode_texts
from vqa_search.core.identity import resolve_identity
from vqa_search.core.inference import Plan, TowerRun
from vqa_search.core.models import load_clip
from vqa_search.indexer.datasets import read_dataset
from vqa_search.retrieval.metrics import summarize
from vqa_search.retrieval.recall import embed_gallery, gallery_ranks

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "flickr8k-sample"
CONFIGS = [("torch", "fp32"), ("torch", "bf16"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8")]
SHAPES_STAGE1 = dict(epochs=12, batch_size=128, lr=1e-3, weight_decay=0.1, patience=4)


def plan(backend: str, precision: str) -> Plan:
    return Plan(TowerRun(backend, precision), TowerRun(backend, precision), (backend, precision))


def name(config: tuple[str, str]) -> str:
    return " ".join(config)


def cosines(got: np.ndarray, reference: np.ndarray) -> dict:
    values = np.einsum("nd,nd->n", got, reference)
    return {"median": round(float(np.median(values)), 6), "min": round(float(values.min()), 6)}


def top10_overlap(text: np.ndarray, images: np.ndarray, reference_text: np.ndarray, reference_images: np.ndarray) -> float:
    ours = np.argsort(-(text @ images.T), axis=1)[:, :10]
    theirs = np.argsort(-(reference_text @ reference_images.T), axis=1)[:, :10]
    return round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ours, theirs)])), 4)


def flickr(sample: Path, model: str, batch_size: int, rounds: int, round_images: int, queries: int,
           limit: int | None = None) -> dict:
    data = read_dataset(sample)
    if limit:
        data.images = data.images[:limit]
        data.captions = [c for c in data.captions if c.image in set(data.images)]
    reference = load_clip(resolve_identity(model, "none"), torch.device("cpu"))
    pixels = torch.stack([reference.preprocess(Image.open(data.images_dir / path).convert("RGB")) for path in data.images])
    captions = list(dict.fromkeys(c.text for c in data.captions))
    clips = {config: dataclasses.replace(reference, plan=plan(*config), _towers=None) for config in CONFIGS}
    for clip in clips.values():  # exports, quantisation, sessions: before the clock
        encode_image_batch(clip, pixels[:2]), encode_texts(clip, captions[:2])

    def embed_images(clip, count: int) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        vectors = np.concatenate([encode_image_batch(clip, pixels[start:start + batch_size])
                                  for start in range(0, count, batch_size)])
        return vectors, count / (time.perf_counter() - started)

    results = {name(config): {"images_per_s": [], "query_ms": []} for config in CONFIGS}
    vectors = {}
    for config, clip in clips.items():  # every embedding once, for faithfulness (timed too)
        images, rate = embed_images(clip, len(pixels))
        started = time.perf_counter()
        text = encode_texts(clip, captions)
        results[name(config)]["captions_per_s"] = round(len(captions) / (time.perf_counter() - started), 1)
        results[name(config)]["images_per_s"].append(rate)
        vectors[config] = images, text
    for _ in range(rounds):
        for config, clip in clips.items():
            results[name(config)]["images_per_s"].append(embed_images(clip, round_images)[1])
            for query in captions[:queries]:
                started = time.perf_counter()
                encode_texts(clip, [query])
                results[name(config)]["query_ms"].append(1000 * (time.perf_counter() - started))
    padded_ms = []  # the ONNX text graph fed all 77 tokens instead of the query's own length
    towers = clips[("onnx", "fp32")].towers
    for query in captions[:queries]:
        started = time.perf_counter()
        towers.text(reference.tokenizer([query]))
        padded_ms.append(1000 * (time.perf_counter() - started))

    ref_images, ref_text = vectors[("torch", "fp32")]
    base = results["torch fp32"]
    for config in CONFIGS:
        row = results[name(config)]
        images, text = vectors[config]
        row["images_per_s_runs"] = [round(v, 1) for v in row["images_per_s"]]
        row["images_per_s"] = round(statistics.median(row["images_per_s"]), 1)
        row["query_ms"] = round(statistics.median(row["query_ms"]), 2)
    for config in CONFIGS:
        row = results[name(config)]
        images, text = vectors[config]
        row["image_speedup"] = round(row["images_per_s"] / base["images_per_s"], 2)
        row["query_speedup"] = round(base["query_ms"] / row["query_ms"], 2)
        row["caption_speedup"] = round(row["captions_per_s"] / base["captions_per_s"], 2)
        row["image_cosine"] = cosines(images, ref_images)
        row["text_cosine"] = cosines(text, ref_text)
        row["top10_overlap"] = top10_overlap(text, images, ref_text, ref_images)
        row["top10_overlap_fp32_text"] = top10_overlap(ref_text, images, ref_text, ref_images)
    return {"model": f"{model} (random weights)", "images": len(pixels), "captions": len(captions),
            "batch_size": batch_size, "rounds": rounds + 1, "queries": queries,
            "onnx_fp32_query_ms_padded_to_77": round(statistics.median(padded_ms), 2), "configs": results}


def shapes(work: Path, images: int, seed: int) -> dict:
    from vqa_search.align.finetune import FinetuneConfig, finetune
    from vqa_search.core.identity import TINY_MODEL
    from vqa_search.shapes import ShapesConfig, make_shapes

    world, checkpoint = work / "shapes", work / "stage1.safetensors"
    started = time.perf_counter()
    make_shapes(world, ShapesConfig(images=images, seed=seed))
    trained = finetune(world, checkpoint, FinetuneConfig(model=TINY_MODEL, pretrained="none", seed=seed,
                                                         **SHAPES_STAGE1), progress=False)
    seconds = time.perf_counter() - started
    data = read_dataset(world)
    reference = load_clip(resolve_identity(TINY_MODEL, str(checkpoint)), torch.device("cpu"))
    recall = {}
    for config in CONFIGS:
        clip = dataclasses.replace(reference, plan=plan(*config), _towers=None)
        ranks = gallery_ranks(embed_gallery(clip, data, "test"))
        recall[name(config)] = {direction: summarize(r) for direction, r in ranks.items()}
    fp32 = recall["torch fp32"]
    for row in recall.values():
        row["worst_R@1_drop"] = round(max(fp32[d]["R@1"] - row[d]["R@1"] for d in ("t2i", "i2t")), 2)
    return {"images": images, "generate_and_train_seconds": round(seconds, 1), "best_epoch": trained.best_epoch,
            "stage1": SHAPES_STAGE1, "test_recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-images", type=int, default=64)
    parser.add_argument("--queries", type=int, default=25)
    parser.add_argument("--shapes-images", type=int, default=1500, help="0: no shapes-world recall")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="Only the first N photos of the sample (a quick faithfulness check).")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    import onnxruntime

    result = {"command": "flock -x /tmp/cpu.lock python benchmarks/precision.py --json benchmarks/results/precision.json",
              "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}}
    result["flickr8k_sample"] = flickr(args.sample, args.model, args.batch_size, args.rounds, args.round_images,
                                       args.queries, args.limit)
    print(json.dumps(result["flickr8k_sample"], indent=1), flush=True)
    if args.shapes_images:
        with tempfile.TemporaryDirectory() as work:
            result["shapes"] = shapes(Path(work), args.shapes_images, args.seed)
        print(json.dumps(result["shapes"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

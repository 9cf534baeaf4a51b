"""The alignment method end to end on the shapes world: do trained-detector regions let stage 2 add
recall and compositional accuracy on top of stage 1, and how far is that from the oracle ceiling?

    python benchmarks/shapes_align.py --json benchmarks/results/shapes_align.json

No download. Generate the shapes world, train the tiny CLIP from scratch (stage 1), index the
collection with that checkpoint, train the Faster R-CNN on the world's boxes (stage 0, from scratch,
on a subset of the train images so the whole run fits its time budget), compute its regions, then
train the cross-attention re-ranker with CLIP frozen (stage 2, λ chosen on val) twice: on the
detector's regions and on the oracle's (each object's true shape, colour, size and box:
`oracle_regions.py`, the ceiling). Test recall and the compositional sets `make-shapes` writes
(SugarCrepe-style files of test images, Winoground-style twin pairs) are scored with stage 1 alone
and with each re-ranker on the same checkpoint and gallery, so every difference is stage 2's alone.
Every step is the library code behind the CLI commands.
"""

from __future__ import annotations

from pathlib import Path

from oracle_regions import oracle_regions
from shapes_stage1 import DETECTOR, DETECTOR_IMAGES, STAGE1, Laps, main, trained_detector_regions, world_with_stage1
from vqa_search.align.compositional import CompositionalConfig, run_compositional
from vqa_search.align.rerank import reranked_run
from vqa_search.align.train_rerank import RerankTrainConfig, train_reranker
from vqa_search.core.identity import TINY_MODEL
from vqa_search.indexer.build import BuildConfig, build_index
from vqa_search.retrieval.recall import RecallConfig, run_recall
from vqa_search.shapes import SUGARCREPE_DIR, WINOGROUND_FILE

STAGE2 = dict(epochs=3, batch_size=64, negatives=2, region_hidden=256, lr=1e-3, patience=2)
TARGETS = {"t2i_R@1_gain": 5.0, "swap_att_gain": 15.0, "winoground_group_ratio": 2.0, "minutes": 20.0}


def run(work: Path, images: int, seed: int) -> dict:
    laps = Laps()
    world, checkpoint, stage1 = world_with_stage1(work, images, seed, laps)
    build_index(world, BuildConfig(model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    laps("index")

    detector, detected = trained_detector_regions(world, work, seed, laps)
    oracle = oracle_regions(world, world / "boxes.json")
    laps("oracle_regions")

    test = run_recall(world, RecallConfig(split="test", model=TINY_MODEL, pretrained=str(checkpoint), progress=False))
    stage2 = {}
    for label, region_set in (("detector", detected.name), ("oracle", oracle.name)):
        trained = train_reranker(world, RerankTrainConfig(
            model=TINY_MODEL, pretrained=str(checkpoint), regions=region_set, lam=None, seed=seed, progress=False,
            out=work / f"rerank-{label}.safetensors", **STAGE2))
        stage2[label] = {"trained": trained, "recall": recall_of(reranked_run(test, trained.path, world / ".vqa-search")),
                         "compositional": compositional(world, checkpoint, trained.path)}
        laps(f"stage2_{label}")

    detector_row, oracle_row = stage2["detector"], stage2["oracle"]
    results = {
        "stage1": recall_of(test),
        "stage1_rerank": detector_row["recall"],
        "compositional": side_by_side(detector_row["compositional"]),
        "detector": {key: detector.to_json()[key] for key in ("AP", "AP50", "best_epoch", "epochs", "train_images",
                                                              "val_images", "seconds_per_epoch", "seconds")},
        "oracle_rerank": {**oracle_row["recall"], "compositional": side_by_side(oracle_row["compositional"])},
        "seconds": laps.total(),
        "seconds_by_step": laps.seconds,
        "images": images,
        "region_sets": {"detector": detected.name, "oracle": oracle.name},
        "stage1_config": STAGE1,
        "stage1_best_epoch": stage1.best_epoch,
        "detector_config": {**DETECTOR, "images": DETECTOR_IMAGES},
        "stage2_config": STAGE2,
        "stage2": {label: {"lambda": row["trained"].lam, "best_epoch": row["trained"].best_epoch,
                           "val": {"global": row["trained"].val_global, "reranked": row["trained"].val_reranked},
                           "seconds": round(row["trained"].seconds, 1)} for label, row in stage2.items()},
    }
    results["targets"] = targets_met(results)
    return results


def recall_of(run) -> dict:
    return {direction: {key: round(value, 2) for key, value in getattr(run, direction).items() if key.startswith("R@")}
            for direction in ("t2i", "i2t")}


def compositional(world: Path, checkpoint: Path, reranker: Path) -> list[dict]:
    """SugarCrepe-style and Winoground-style results, global then re-ranked, as `bench compositional` gives them."""
    config = CompositionalConfig(model=TINY_MODEL, pretrained=str(checkpoint), index=world, reranker=reranker,
                                 progress=False)
    return [*run_compositional(world / SUGARCREPE_DIR, config), *run_compositional(world / WINOGROUND_FILE, config)]


def side_by_side(runs: list[dict]) -> dict:
    """{category: {global, reranked, chance, items}} from the global / re-ranked pairs of results."""
    table = {}
    for global_run, reranked_run_ in zip(runs[0::2], runs[1::2]):
        prefix = "winoground_" if global_run["benchmark"] != "sugarcrepe" else ""
        for category, value in global_run["scores"].items():
            table[prefix + category] = {"global": round(value, 2), "reranked": round(reranked_run_["scores"][category], 2),
                                        "chance": round(global_run["chance"][category], 2),
                                        "items": global_run["counts"][category]}
    return table


def targets_met(results: dict) -> dict:
    def gains(row: dict, compositional: dict) -> dict:
        group = compositional["winoground_group"]
        measured = {"t2i_R@1_gain": round(row["t2i"]["R@1"] - results["stage1"]["t2i"]["R@1"], 2),
                    "swap_att_gain": round(compositional["swap_att"]["reranked"] - compositional["swap_att"]["global"],
                                           2),
                    "winoground_group_ratio": round(group["reranked"] / group["global"], 2) if group["global"] else None}
        met = {key: value is not None and value >= TARGETS[key] for key, value in measured.items()}
        met["winoground_group_ratio"] = group["reranked"] > 0 and group["reranked"] >= 2 * group["global"]
        return {**measured, "met": met}

    measured = {"detector": gains(results["stage1_rerank"], results["compositional"]),
                "oracle": gains(results["oracle_rerank"], results["oracle_rerank"]["compositional"])}
    return {"targets": TARGETS, **measured, "minutes": round(results["seconds"] / 60, 1),
            "within_time": results["seconds"] / 60 <= TARGETS["minutes"]}


if __name__ == "__main__":
    main(__doc__, run)

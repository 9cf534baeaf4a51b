"""Why stage 2 gains little from trained-detector regions: do they find the objects, and do their features
carry each object's shape, colour and size?

    python benchmarks/shapes_align.py --work WORK --json OUT   # keeps the world, its index and region sets
    python benchmarks/region_probe.py WORK/shapes

For every true object (the world's boxes.json): the best IoU among its image's stored regions (test
images), and linear probes (logistic regression, 300 Adam steps on standardised features) from the
box-head feature of its best region (IoU >= 0.5) to its shape, colour and size, trained on the train
split's objects, scored on the test split's, beside the majority class.
"""
import json
import sys

import numpy as np
import torch
from vqa_search.align.region_store import RegionSet
torch.set_num_threads(1)
world = sys.argv[1] if len(sys.argv) > 1 else "shapes"
region_set = sys.argv[2] if len(sys.argv) > 2 else "frcnn-mobilenet-trained"
rs = RegionSet.open(world, region_set)
coco = json.load(open(world + "/boxes.json"))
split = {}
for s, f in (("train", "trainImages"), ("test", "testImages")):
    for n in open(f"{world}/Flickr_8k.{f}.txt").read().split(): split[n] = s
names = {i["id"]: i["file_name"] for i in coco["images"]}
cats = {c["id"]: c["name"] for c in coco["categories"]}
covered = {0.5: 0, 0.7: 0}
X = {"train": [], "test": []}; Y = {"train": [], "test": []}
for a in coco["annotations"]:
    name = names[a["image_id"]]; s = split.get(name)
    if s is None: continue
    row = rs.row_of(name); boxes = rs.boxes([row])[0]; g = a["bbox"]
    x1, y1 = np.maximum(boxes[:, 0], g[0]), np.maximum(boxes[:, 1], g[1])
    x2, y2 = np.minimum(boxes[:, 2], g[0] + g[2]), np.minimum(boxes[:, 3], g[1] + g[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    iou = inter / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + g[2] * g[3] - inter)
    if s == "test":
        for threshold in covered:
            covered[threshold] += iou.max() >= threshold
    if iou.max() < 0.5: continue
    X[s].append(rs.features([row])[0, iou.argmax(), :1024].astype(np.float32))
    Y[s].append((cats[a["category_id"]], a["attributes"]["color"], a["attributes"]["size"]))
result = {}
for k, label in enumerate(("shape", "color", "size")):
    values = sorted({y[k] for y in Y["train"]})
    xt, xv = (torch.tensor(np.stack(X[s])) for s in ("train", "test"))
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    yt, yv = (torch.tensor([values.index(y[k]) for y in Y[s]]) for s in ("train", "test"))
    lin = torch.nn.Linear(1024, len(values)); opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(lin(xt), yt); loss.backward(); opt.step()
    acc = (lin(xv).argmax(1) == yv).float().mean().item()
    majority = max(np.bincount(yv.numpy())) / len(yv)
    result[label] = {"probe_accuracy": round(100 * acc, 1), "majority": round(100 * majority, 1)}
test_objects = sum(split.get(names[a["image_id"]]) == "test" for a in coco["annotations"])
coverage = {f"iou_{t}": round(100 * n / test_objects, 1) for t, n in covered.items()}
print(json.dumps({"test_objects_covered": coverage, "probe_train_objects": len(X["train"]),
                  "probe_test_objects": len(X["test"]), **result}))

"""Closed-set accuracy of a checkpoint trained elsewhere (a lent GPU) on the dev protocol: every dev photo
embedded through CKPT_DIR (what `classify --index` does for a query), the 1/3 queries classified by the
weighted kNN vote (k 20, T 0.07) against the 2/3 gallery (seed 0), as benchmarks/preset_accuracy.py scores.

    python benchmarks/score_checkpoint.py emb/lite0 CKPT_DIR --work /tmp/score
    python benchmarks/score_checkpoint.py emb/lite0 CKPT_DIR --work /tmp/s320 --test-image-size 320 [--flip]

`--test-image-size`: embed at another resolution than the checkpoint records (a copy of the checkpoint with
that framing; the weights are the same files); `--flip`: average each photo with its mirror. It also prints
the kNN top-1 of the checkpoint's own validation images (the 20% of the gallery `index build --tune` held
out, seed 0) against the other 80%: the figure a choice of test size can be made on without the queries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from carsearch.embed import embed_dataset
from carsearch.embed.settings import EmbedJob
from carsearch.embed.store import load_embeddings
from carsearch.eval.splits import stratified_split
from carsearch.train.partial import knn_top1

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuned_accuracy import closed_set, zero_shot_open_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dir", type=Path, help="frozen embeddings of the whole dev folder")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--test-image-size", type=int)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument(
        "--zero-shot", action="store_true", help="also Recall@K on classes 99-196 and open-set AUROC (bench)"
    )
    a = ap.parse_args()
    emb = load_embeddings(a.emb_dir)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    info = json.loads((a.checkpoint / "checkpoint.json").read_text())
    checkpoint = a.checkpoint
    if a.test_image_size:
        checkpoint = a.work / "checkpoint"
        skip = shutil.ignore_patterns("activations", "refit", "*.pt")
        shutil.copytree(a.checkpoint, checkpoint, ignore=skip)
        prep = info["preprocessing"]
        size = a.test_image_size
        prep.update(size=size, resize=max(size, round(size * prep["resize"] / prep["size"])))
        (checkpoint / "checkpoint.json").write_text(json.dumps(info))
    embed_dataset(
        EmbedJob(
            Path(emb.manifest["dataset"]["root"]),
            a.work / "all",
            backbone=info["backbone"],
            weights=str(checkpoint),
            flip=a.flip,
        ),
        progress=False,
    )
    tuned = load_embeddings(a.work / "all")
    assert (tuned.ids == emb.ids).all()
    r = closed_set(tuned.vectors[gal], emb.subset(gal), tuned.vectors[qry], emb.subset(qry))
    c = emb.class_ids[gal]
    train, val = stratified_split(c, 0.8, 0)
    v = tuned.vectors[gal]
    r["validation_knn_top1"] = knn_top1(v[train], c[train], v[val], c[val])
    if a.zero_shot:
        r.update(zero_shot_open_set(a.work / "all", a.work / "bench"))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

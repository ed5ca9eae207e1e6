"""Closed-set accuracy of a checkpoint trained elsewhere (a lent GPU) on the dev protocol: every dev photo
embedded through CKPT_DIR (what `classify --index` does for a query), the 1/3 queries classified by the
weighted kNN vote (k 20, T 0.07) against the 2/3 gallery (seed 0), as benchmarks/preset_accuracy.py scores.

    python benchmarks/score_checkpoint.py emb/lite0 CKPT_DIR --work /tmp/score
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carsearch.embed import embed_dataset
from carsearch.embed.store import load_embeddings
from carsearch.eval.splits import stratified_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuned_accuracy import closed_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dir", type=Path, help="frozen embeddings of the whole dev folder")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    emb = load_embeddings(a.emb_dir)
    gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
    info = json.loads((a.checkpoint / "checkpoint.json").read_text())
    embed_dataset(
        Path(emb.manifest["dataset"]["root"]),
        a.work / "all",
        backbone=info["backbone"],
        weights=str(a.checkpoint),
        progress=False,
    )
    tuned = load_embeddings(a.work / "all")
    assert (tuned.ids == emb.ids).all()
    r = closed_set(tuned.vectors[gal], emb.subset(gal), tuned.vectors[qry], emb.subset(qry))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

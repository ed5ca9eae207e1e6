"""Which output of a partial-fine-tune checkpoint to embed with: the projection, the pooled features it is
trained on, or both concatenated (each L2-normalised, weighted), scored from cached activations.

Dev protocol (shared/DESIGN.md). `--protocol closed`: the gallery (2/3 of each class, seed 0) and the
queries (1/3) embedded, kNN vote top-1 (k 20, T 0.07). `--protocol zero-shot`: the photos of the classes
outside `--known` (never trained on), each querying the others, Recall@1/2/4/8. Both with and without
test-time flip. The activations (the checkpoint's frozen prefix at its test framing) are cached in --cache.

    python benchmarks/embedding_choice.py emb/lite0 W/full/index/model --protocol closed --cache W/ec
    python benchmarks/embedding_choice.py emb/lite0 W/known/index/model --protocol zero-shot --cache W/ec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from carsearch.embed.store import load_embeddings
from carsearch.eval.neighbors import retrieval_recall
from carsearch.eval.splits import class_range, stratified_split
from carsearch.models.checkpoint import load_checkpoint
from carsearch.models.cut import cut
from carsearch.train.partial import embed_cached

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preset_accuracy import checkpoint_activations
from tuned_accuracy import closed_set

WEIGHTS = (1.0, 0.7, 0.5, 0.3, 0.0)  # the projection's weight; 1: the projection alone, 0: the features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dir", type=Path, help="frozen embeddings of the whole dev folder")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--protocol", choices=("closed", "zero-shot"), required=True)
    ap.add_argument("--known", default="1-98", help="zero-shot: the classes trained on")
    ap.add_argument("--cache", type=Path, required=True)
    a = ap.parse_args()
    emb = load_embeddings(a.emb_dir)
    if a.protocol == "closed":
        gal, qry = stratified_split(emb.class_ids, 2 / 3, 0)
        groups = {"gallery": gal, "queries": qry}
    else:
        groups = {"unseen": np.flatnonzero(~np.isin(emb.class_ids, sorted(class_range(a.known))))}
    x, trained = checkpoint_activations(emb, a.checkpoint, a.cache, groups, ("plain", "mirror"))
    net = load_checkpoint(a.checkpoint, best=True).model
    net.with_features = False  # the two parts are taken apart here
    suffix = cut(net.backbone, trained).suffix
    print(f"{a.checkpoint}, {a.protocol}:")
    for flip in (False, True):
        parts = {}
        for name, acts in x.items():
            views = acts if flip else acts[:, :1]
            parts[name] = (
                embed_cached(net, suffix, views, True, head=True),
                embed_cached(net, suffix, views, True, head=False),
            )
        for w in WEIGHTS:
            v = {n: np.hstack([np.sqrt(w) * p, np.sqrt(1 - w) * f]) for n, (p, f) in parts.items()}
            if a.protocol == "closed":
                r = closed_set(v["gallery"], emb.subset(gal), v["queries"], emb.subset(qry))
                figures = f"top-1 {100 * r['top1']:.1f}%  top-5 {100 * r['top5']:.1f}%"
            else:
                r = retrieval_recall(v["unseen"], emb.class_ids[groups["unseen"]])
                figures = "  ".join(f"R@{k.split('@')[1]} {100 * val:.1f}%" for k, val in r.items())
            print(f"  projection weight {w:.1f}, flip {'on ' if flip else 'off'}: {figures}", flush=True)


if __name__ == "__main__":
    main()

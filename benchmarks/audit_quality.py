"""`carsearch audit` measured side by side with imagededup and cleanlab, in one run.

1. Near-duplicates: N photos of the dev folder planted again, edited (benchmarks/plant.py), with a seed
   other than the one the default threshold was chosen on; precision and recall over the planted pairs
   (a found pair counts against precision when it involves a planted photo and is not its pair, strictly;
   a second figure counts right a copy paired with the dataset's own pixel-for-pixel duplicate of its
   original; pairs between two original dev photos are reported apart: Stanford Cars holds real ones).
   Peers in the same run: imagededup's CNN method at its default threshold 0.9 (its MobileNetV3 weights
   cannot be downloaded here, so it is given the same offline EfficientNet-Lite0 network through its
   CustomModel hook) and its perceptual hash at its default distance 10.
2. Mislabels: 5% of the dev labels flipped at random (seeded); AUROC and precision at the top N (N = the
   number flipped) of carsearch's score, and cleanlab's label-quality scores and `find_label_issues` fed
   the same kNN vote probabilities; with frozen embeddings and with car-tuned ones (`index build
   --tune-head` trained on the noisy labels, as a user would).

    python benchmarks/audit_quality.py EMB_DEV --work DIR [--plant 300 --seed 1]

EMB_DEV: the dev folder embedded with efficientnet_lite0 (`carsearch embed ... --backbone
efficientnet_lite0`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carsearch import defaults
from carsearch.audit.findings import near_duplicate_pairs
from carsearch.audit.scores import LabelQuality, label_quality, neighbours
from carsearch.embed import embed_dataset, load_embeddings
from carsearch.embed.settings import EmbedJob
from carsearch.embed.store import EmbeddingSet, write_embedding_set
from carsearch.eval.edited_copies import cosine_threshold
from carsearch.index.families import neighbour_index
from carsearch.index.settings import IndexSettings
from plant import EDITS, REPOST_EDITS, flip_labels, plant_duplicates

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stanford-cars-dev"


def pr(found: set, truth: set, planted: set, same_photo=None) -> dict:
    """Precision and recall over the planted pairs. `same_photo(pair)`: whether a found pair of a planted
    copy with another photo than its original is the dataset's own duplicate of that original (counted
    right in "precision, dataset duplicates right"; "precision (strict)" counts it wrong)."""
    involved = {p for p in found if p[0] in planted or p[1] in planted}
    tp = len(found & truth)
    wrong = involved - truth
    duplicates = {p for p in wrong if same_photo is not None and same_photo(p)}
    return {
        "found_pairs": len(found),
        "pairs_with_a_planted_photo": len(involved),
        "true_positives": tp,
        "precision": round(tp / len(involved), 4) if involved else 1.0,
        "copy_with_a_duplicate_of_its_original": len(duplicates),
        "precision_dataset_duplicates_right": round((tp + len(duplicates)) / len(involved), 4)
        if involved
        else 1.0,
        "recall": round(tp / len(truth), 4),
        "pairs_between_original_photos": len(found - involved),
    }


def _same_photo_as_original(emb: EmbeddingSet, original_of: dict[int, int]):
    """pair -> whether the photo a planted copy was paired with is, pixel for pixel, a copy of the copy's
    original in the dataset itself (Stanford Cars holds some photos twice): the two originals aligned by
    their local features correlate at >= 0.98, far above the rule's own EDITED_COPY_MIN_NCC."""
    from carsearch.eval.edited_copies import LocalMatcher, photo_lookup

    matcher = LocalMatcher(photo_lookup(emb))

    def same(pair: tuple[int, int]) -> bool:
        copy, other = pair if pair[0] in original_of else pair[::-1]
        return other != original_of[copy] and matcher.match(original_of[copy], other).ncc >= 0.98

    return same


def duplicates(work: Path, n: int, seed: int) -> dict:
    folder = work / f"planted-{seed}"
    pairs = plant_duplicates(DEV, folder, n, seed, edits=REPOST_EDITS + EDITS)
    emb_dir = work / f"emb-planted-{seed}"
    embed_dataset(EmbedJob(folder, emb_dir, backbone="efficientnet_lite0"), progress=False)
    emb = load_embeddings(emb_dir)
    row = {str(p): i for i, p in enumerate(emb.paths)}
    truth = {tuple(sorted((row[a], row[b]))) for a, b, _ in pairs}
    planted = {row[b] for _, b, _ in pairs}
    reposts = {tuple(sorted((row[a], row[b]))) for a, b, e in pairs if e in REPOST_EDITS}
    out = {"planted": len(pairs), "photos": len(emb), "edits": sorted(REPOST_EDITS + EDITS)}
    index = neighbour_index(emb.vectors)
    nb = neighbours(index, emb.vectors, defaults.EDITED_COPY_K)
    same_photo = _same_photo_as_original(emb, {row[b]: row[a] for a, b, _ in pairs})
    for name, local in (("carsearch, cosine only", False), ("carsearch, cosine + local features", True)):
        t0 = time.perf_counter()
        i, j, _, _ = near_duplicate_pairs(emb, index, nb, cosine_threshold(None, local), local)
        found = set(zip(i.tolist(), j.tolist(), strict=True))
        out[name] = {
            **pr(found, truth, planted, same_photo),
            "recall_of_reposts": round(len(found & reposts) / len(reposts), 4),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    for name, finder in (("imagededup CNN (lite0, 0.9)", _imagededup_cnn), ("imagededup PHash (10)", _phash)):
        if importlib.util.find_spec("imagededup") is None:
            out[name] = "not installed (pip install imagededup)"
            continue
        t0 = time.perf_counter()
        found_names = finder(folder)
        found = {tuple(sorted((row[a], row[b]))) for a, b in found_names if a in row and b in row and a != b}
        out[name] = {**pr(found, truth, planted, same_photo), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _pairs_from(result: dict) -> set[tuple[str, str]]:
    return {(a, b) for a, dups in result.items() for b in dups}


def _imagededup_cnn(folder: Path) -> set[tuple[str, str]]:
    import torch
    from imagededup.methods import CNN
    from imagededup.utils import CustomModel
    from imagededup.utils.models import MobilenetV3

    from carsearch.models import load_backbone

    loaded = load_backbone("efficientnet_lite0", "imagenet")

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = loaded.model.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    cnn = CNN(
        verbose=False,
        model_config=CustomModel(name="lite0", model=Features(), transform=MobilenetV3.transform),
    )
    return _pairs_from(cnn.find_duplicates(image_dir=folder, min_similarity_threshold=0.9, recursive=True))


def _phash(folder: Path) -> set[tuple[str, str]]:
    from imagededup.methods import PHash

    return _pairs_from(
        PHash(verbose=False).find_duplicates(image_dir=folder, max_distance_threshold=10, recursive=True)
    )


def mislabels(emb_dev: Path, work: Path, seed: int) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from carsearch.train.tuned import EMBEDDINGS_DIR, build_tuned_index

    clean = load_embeddings(emb_dev)
    noisy_labels, flipped = flip_labels(clean.labels, 0.05, seed)
    noisy_dir = work / "emb-noisy"
    # The class numbers move with the labels: the head trains on them.
    class_of = dict(zip(clean.labels, clean.class_ids, strict=True))
    noisy_ids = np.array([class_of[lab] for lab in noisy_labels], dtype=np.int32)
    noisy = replace(clean, labels=noisy_labels, class_ids=noisy_ids)
    write_embedding_set(noisy, noisy_dir, f"5% of labels flipped, seed {seed}")
    build_tuned_index(
        noisy_dir, work / "index-noisy-tuned", progress=False, index=IndexSettings(calibrate=False)
    )
    out = {"photos": len(clean), "flipped": int(flipped.sum()), "k": K}
    variants = {
        "frozen": label_quality(noisy_labels, *_neighbours(noisy_dir), with_probs=True),
        "tuned": label_quality(
            noisy_labels, *_neighbours(work / "index-noisy-tuned" / EMBEDDINGS_DIR), with_probs=True
        ),
        "tuned, cross-fitted": _cross_fitted(noisy, noisy_dir, work, seed),
    }
    for name, q in variants.items():
        top = np.argsort(-q.mislabel_score, kind="stable")[: flipped.sum()]
        labels_int = np.searchsorted(q.classes, noisy_labels)
        probs = q.probs + 1e-9  # cleanlab wants every row to sum to 1 with no empty class
        probs /= probs.sum(axis=1, keepdims=True)
        cl_scores = get_label_quality_scores(labels_int, probs)
        issues = find_label_issues(labels_int, probs)
        cl_top = np.argsort(cl_scores, kind="stable")[: flipped.sum()]
        out[name] = {
            "carsearch": {
                "auroc": round(float(roc_auc_score(flipped, q.mislabel_score)), 4),
                "precision_at_n": round(float(flipped[top].mean()), 4),
                "flagged": int(q.flagged.sum()),
                "flagged_precision": round(float(flipped[q.flagged].mean()), 4) if q.flagged.any() else None,
                "flagged_recall": round(float(q.flagged[flipped].mean()), 4),
            },
            "cleanlab": {
                "auroc": round(float(roc_auc_score(flipped, -cl_scores)), 4),
                "precision_at_n": round(float(flipped[cl_top].mean()), 4),
                "flagged": int(issues.sum()),
                "flagged_precision": round(float(flipped[issues].mean()), 4) if issues.any() else None,
                "flagged_recall": round(float(issues[flipped].mean()), 4),
            },
        }
    return out


K = defaults.AUDIT_VOTE_K


def _neighbours(folder: Path) -> tuple:
    emb = load_embeddings(folder)
    return neighbours(neighbour_index(emb.vectors), emb.vectors, K), K


def _cross_fitted(noisy: EmbeddingSet, noisy_dir: Path, work: Path, seed: int) -> LabelQuality:
    """Two folds: a head trained on one fold's (noisy) labels embeds everything; the other fold's photos are
    scored in that space, so no photo is scored by a head that saw its label (cleanlab's out-of-sample
    advice)."""
    from carsearch.embed.project import project_embeddings
    from carsearch.train.tuned import HEAD_DIR, build_tuned_index

    fold = np.random.default_rng(seed).integers(0, 2, len(noisy))
    n = len(noisy)
    own, voted, voted_share = np.zeros(n), np.full(n, "", dtype=object), np.zeros(n)
    probs = None
    for f in (0, 1):
        write_embedding_set(noisy.subset(fold != f), work / f"fold{f}", f"training fold {f}")
        build_tuned_index(
            work / f"fold{f}", work / f"fold{f}-index", progress=False, index=IndexSettings(calibrate=False)
        )
        project_embeddings(noisy_dir, work / f"fold{f}-index" / HEAD_DIR, work / f"fold{f}-projected")
        q = label_quality(noisy.labels, *_neighbours(work / f"fold{f}-projected"), with_probs=True)
        part = fold == f
        own[part], voted[part], voted_share[part] = q.own_share[part], q.voted[part], q.voted_share[part]
        probs = q.probs.copy() if probs is None else probs
        probs[part] = q.probs[part]
    return LabelQuality(own, voted, voted_share, probs, q.classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("emb_dev", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--plant", type=int, default=300)
    ap.add_argument(
        "--seed",
        type=int,
        default=2,
        help="planting and flipping seed (0 chose the defaults, 1 the edited-copy rule)",
    )
    ap.add_argument("--skip-duplicates", action="store_true", help="only the mislabel part")
    ap.add_argument("--skip-mislabels", action="store_true", help="only the near-duplicate part")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    result = {} if a.skip_duplicates else {"duplicates": duplicates(a.work, a.plant, a.seed)}
    if not a.skip_mislabels:
        result["mislabels"] = mislabels(a.emb_dev, a.work, a.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

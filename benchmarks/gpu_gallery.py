"""The dev protocol's gallery (2/3 of each class, seed 0) as a small csv-layout folder that fits the device
tool's 64 MiB transfer limit: WebP quality 75, longest side 320 px (26 MB for 3,663 photos instead of 73).

    python benchmarks/gpu_gallery.py emb/lite0 --out .gpu/data    # then: benchmarks/gpu_preset.sh on the GPU
    python benchmarks/score_checkpoint.py emb/lite0 CKPT_DIR --work /tmp/score   # back here: the queries
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from PIL import Image

from carsearch.embed.store import load_embeddings
from carsearch.eval.splits import stratified_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb_dir", type=Path, help="embeddings of the whole dev folder (their order splits it)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    emb = load_embeddings(a.emb_dir)
    root = Path(emb.manifest["dataset"]["root"])
    gal, _ = stratified_split(emb.class_ids, 2 / 3, 0)
    (a.out / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "classes.csv", a.out / "classes.csv")
    with open(root / "labels.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    with open(a.out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "class_id", "class_name"])
        for i in gal:
            rel = Path(str(emb.paths[i]))
            name = f"images/{rel.stem}.webp"
            with Image.open(root / rel) as im:
                im = im.convert("RGB")
                im.thumbnail((320, 320))
                im.save(a.out / name, "WEBP", quality=75)
            r = rows[str(rel)]
            w.writerow([name, r["class_id"], r["class_name"]])
    print(f"{len(gal)} gallery photos in {a.out}")


if __name__ == "__main__":
    main()

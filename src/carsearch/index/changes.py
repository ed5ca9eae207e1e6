"""Changing an index folder in place: adding the new shards of an embedding folder (each file once),
removing images by id. Each change writes a new version of the folder atomically (index/store.py)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from carsearch.embed.project import head_of, project
from carsearch.embed.store import load_embeddings, read_manifest
from carsearch.errors import CarsearchError, ProvenanceMismatch
from carsearch.fsutil import exclusive_lock
from carsearch.index.build import check_unique_ids, source_entry
from carsearch.index.idlist import check_paths, read_id_list
from carsearch.index.store import Gallery, is_image_id, open_bundle, save_bundle
from carsearch.index.stream import unseen_files
from carsearch.provenance import check_compatible

log = logging.getLogger(__name__)


def add_to_index(index_dir: str | Path, emb_dir: str | Path, allow_duplicates: bool = False) -> dict:
    """Add the shards of `emb_dir` that the index does not hold yet, without rebuilding it.

    Rows whose file (sha256) the index already holds are skipped unless `allow_duplicates` (the same
    photos embedded again under new ids would come back twice in every search); the result counts them
    in `skipped_duplicates`."""
    folder = Path(index_dir).expanduser().resolve()
    with exclusive_lock(folder):
        bundle = open_bundle(folder)
        emb_folder = Path(emb_dir).expanduser().resolve()
        manifest = read_manifest(emb_folder)
        head = _head_for(bundle.info, bundle.provenance, manifest["provenance"])
        prov = head[2] if head is not None else manifest["provenance"]
        try:
            check_compatible(bundle.provenance, prov, str(folder), str(emb_folder))
        except ProvenanceMismatch as e:
            network = (bundle.info.get("tuning") or {}).get("network")
            if network is None:
                raise
            raise ProvenanceMismatch(
                f"{e} This index is car-tuned: embed the new photos with `carsearch embed ... --backbone "
                f"{bundle.provenance['backbone']} --weights {network}`, then add that folder.",
                e.field,
            ) from None
        sources = list(bundle.info["sources"])
        src = next((i for i, s in enumerate(sources) if s["embeddings"] == str(emb_folder)), None)
        held = {(s["file"], s["sha256"]) for s in sources[src]["shards"]} if src is not None else set()
        new = [s["file"] for s in manifest["shards"] if (s["file"], s["sha256"]) not in held]
        if not new:
            log.info("%s has no shards the index does not already hold.", emb_folder)
            return {**bundle.info, "added": 0}
        emb = load_embeddings(emb_folder, shards=new)
        if head is not None:  # frozen embeddings added to a head-tuned index: projected as they come
            emb = replace(emb, vectors=project(emb.vectors, head[0], head[1]))
        if src is not None:
            # A shard of the same folder can come back grown: `embed --limit` stopped inside it, a later
            # run finished it. Ids are record positions, so its rows already indexed are the same images:
            # skip them (after checking that they are), add the rest.
            rows = bundle.gallery.rows(emb.ids)
            held_rows = rows >= 0
            if held_rows.any():
                if not (bundle.gallery.paths[rows[held_rows]] == emb.paths[held_rows]).all():
                    raise CarsearchError(
                        f"{emb_folder} reuses ids the index holds for other images; rebuild the index."
                    )
                emb = emb.subset(~held_rows)
        skipped = 0
        if not allow_duplicates:
            # Against the index only: copies inside one embedding folder are that collection's own
            # (`carsearch audit` reports them), as in a multi-folder `index build`.
            fresh_rows = unseen_files(emb.sha256, set(bundle.gallery.sha256.tolist()))
            skipped = int((~fresh_rows).sum())
            if skipped:
                log.warning(
                    "skipped %d of %d images of %s: the index already holds the same files (sha256); "
                    "--allow-duplicates adds them anyway.",
                    skipped,
                    len(emb),
                    emb_folder,
                )
                emb = emb.subset(fresh_rows)
        if len(emb) == 0:
            return {**bundle.info, "added": 0, "skipped_duplicates": skipped}
        check_unique_ids(emb.ids, bundle.gallery.ids)
        fresh = source_entry(emb_folder, manifest)
        if src is None:
            src = len(sources)
            sources.append({**fresh, "shards": [s for s in fresh["shards"] if s["file"] in new]})
        else:
            # The source now holds every shard of the manifest it has rows from.
            kept = [s for s in sources[src]["shards"] if s["file"] not in new]
            sources[src] = {**fresh, "shards": kept + [s for s in fresh["shards"] if s["file"] in new]}
        add_s = bundle.index.add(emb.vectors, emb.ids)
        gallery = bundle.gallery.concat(Gallery.from_embeddings(emb, src))
        info = {**bundle.info, "sources": sources, "memory_bytes": bundle.index.memory_bytes}
        info["build"] = {**info["build"], "last_add_seconds": round(add_s, 3)}
        info = save_bundle(folder, bundle.index, gallery, info)
        return {**info, "added": len(emb), "skipped_duplicates": skipped}


def _head_for(info: dict, index_prov: dict, prov: dict) -> tuple | None:
    """(W, b, projected provenance) when the index was tuned with a head (`--tune head`) and `prov` is
    the provenance of the frozen embeddings that head projects; else None."""
    tuning = info.get("tuning") or {}
    network = tuning.get("network") or tuning.get("head")
    if (
        tuning.get("mode", "head") != "head"
        or network is None
        or prov.get("weights") == index_prov.get("weights")
    ):
        return None
    try:
        return head_of(Path(network), prov)
    except CarsearchError:
        return None  # not the head's kind of embeddings: the compatibility check says what differs


def remove_from_index(index_dir: str | Path, ids: list[int], id_files: list[str | Path] = ()) -> dict:
    """Remove images by id (where the index type supports removal). `id_files`: the id lists `ids` came
    from, whose paths must be those of the photos the ids stand for in this index (index/idlist.py)."""
    folder = Path(index_dir).expanduser().resolve()
    with exclusive_lock(folder):
        bundle = open_bundle(folder)
        if id_files:
            check_paths(
                [read_id_list(f) for f in id_files], [(str(folder), bundle.gallery.ids, bundle.gallery.paths)]
            )
        out_of_range = [i for i in ids if not is_image_id(i)]
        if out_of_range:
            raise CarsearchError(
                f"{out_of_range[0]} is not an image id (ids are 64-bit integers); `carsearch search --json` "
                "shows the ids an index holds."
            )
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        present = wanted[bundle.gallery.rows(wanted) >= 0]
        missing = np.setdiff1d(wanted, present)
        if len(present) == 0:
            raise CarsearchError(f"none of the {len(wanted)} ids is in the index (first: {int(wanted[0])}).")
        removed = bundle.index.remove(present)
        keep = np.ones(len(bundle.gallery), bool)
        keep[bundle.gallery.rows(present)] = False
        info = save_bundle(
            folder,
            bundle.index,
            bundle.gallery.take(np.flatnonzero(keep)),
            {**bundle.info, "memory_bytes": bundle.index.memory_bytes},
        )
        return {**info, "removed": removed, "not_found": [int(i) for i in missing]}

"""Every default carsearch uses, in one import-light place (no torch, faiss or numpy).

The CLI, the Python API, the bench settings, the trainer and the server read their defaults from here,
so a default is written once; configs/default.toml mirrors the embed table (a test keeps them in step).
"""

from __future__ import annotations

import os

# --- embedding -----------------------------------------------------------------------------------------
BACKBONE = "resnet50"  # the design card's default
TRAIN_BACKBONE = "efficientnet_lite0"  # the backbone with real ImageNet weights offline
WEIGHTS = "imagenet"
CROP = "squash"  # measured best for wide car photos (docs/benchmarks.md)
CROP_MODES = ("center", "squash", "pad")
# Dataset layouts (datasets/) and Stanford Cars' splits: the choices the CLI offers.
FORMATS = ("auto", "csv", "folders", "stanford", "vmmrdb", "unlabeled")
SPLITS = ("train", "test", "all")
ENGINES = ("local", "ray")
BATCH_SIZE = 32
SHARD_SIZE = 4096
# The shard in progress is saved (as a part) this often, and on Ctrl-C: a killed job loses at most this much
# work, an interrupted one none. Overhead measured in docs/benchmarks.md (embedding throughput).
SAVE_EVERY = 30.0  # seconds
DEVICE = "auto"
DEVICES = ("auto", "cpu", "cuda")
PRECISION = "auto"
PRECISIONS = ("auto", "fp32", "bf16")
# auto: OpenVINO on the CPU when installed (the `openvino` extra), PyTorch elsewhere (embed/runtimes.py).
RUNTIME = "auto"
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
# Seconds a weights download waits for its server to answer a connection before saying it is offline
# (instead of the library's own minute of retries).
DOWNLOAD_PROBE_TIMEOUT = 3.0
# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): batch embedding skips larger images.
MAX_PIXELS = 89_478_485

# --- classification and search -------------------------------------------------------------------------
K_SEARCH = 10  # neighbours shown by `search`
K_VOTE = 20  # neighbours that vote (DINO's kNN protocol)
TEMPERATURE = 0.07  # vote weight exp(cos / T) (DINO's kNN protocol)
MAX_K = 1000  # the most neighbours one query may ask for (CLI and Python API)
# Classification levels: the whole class name ("Audi TTS Coupe 2012"), its make, its year.
LEVELS = ("class", "make", "year")
LEVEL = "class"
# "model" named the whole class until issue 22 (while --model filters on the car model, "TTS Coupe"):
# still accepted, answered as "class".
LEVEL_ALIASES = {"model": "class"}

# --- open set ------------------------------------------------------------------------------------------
OPENSET_K = 1  # score = similarity to this neighbour (1 = the nearest): measured best (docs/benchmarks.md)
TPR = 0.95  # share of known-model images the threshold keeps
# Fewer held-out photos than this and a threshold at the 95% point is little more than the lowest score seen:
# index build says the unknown-model answers are rough.
MIN_CALIBRATION_PHOTOS = 100
CALIBRATION_SAMPLE = 2000  # collection images scored leave-one-out when an index is built

# --- index ---------------------------------------------------------------------------------------------
FACTORY = "auto"
MEMORY_BUDGET = 4 << 30
MEMORY_BUDGET_TEXT = "4G"
TARGET_RECALL = 0.95
TUNE_K = 10
TUNE_QUERIES = 1000
MAX_TRAIN_VECTORS = 200_000
# A streaming build trains on at most (memory budget / 8 bytes per dimension) vectors, never fewer than
# this: OPQ and PQ codebooks want ~40 vectors per centroid, and collections this small train on all.
MIN_TRAIN_VECTORS = 20_000
SEED = 0

# --- evaluation ----------------------------------------------------------------------------------------
GALLERY_FRACTION = 2 / 3  # dev protocol: 2/3 of each class gallery (and training), 1/3 queries
KNOWN_CLASSES = "1-98"  # open set: classes in the gallery
TEST_CLASSES = "99-196"  # Cars196 zero-shot protocol: test classes
# (both: when a collection's class ids do not fit them, bench splits its classes in two seeded halves)
# The bench's recommended index type: it reaches the target recall and loses at most this much kNN top-1
# to the best type measured; an approximate type must answer this many times faster than exact search.
RECOMMEND_MAX_TOP1_LOSS = 0.01
RECOMMEND_MIN_SPEEDUP = 1.5
BENCH_TIMING_SECONDS = 0.5  # a batched speed figure: the best of 3 timings of repeated searches this long
BENCH_MIN_TIMING_SECONDS = 0.01  # at least this long (shorter is all timer noise)
BENCH_MAX_TIMING_SECONDS = 60.0  # and at most this long (each index type and sweep point takes ~3x it)

# --- training ------------------------------------------------------------------------------------------
EPOCHS = 10
HEAD_EPOCHS = 60
LOSS = "proxy-anchor"
EMBED_DIM = 512
TRAIN_BATCH = 32
HEAD_BATCH = 256
PER_CLASS = 4
LR = 1e-4
HEAD_LR = 1e-3
# Learning-rate multipliers: the projection head and the loss's proxies start random and must move faster
# than the pretrained backbone (Proxy-Anchor trains its proxies at 100x the network's rate).
HEAD_LR_MULT = 10
PROXY_LR_MULT = 100  # full fine-tune: proxies at 100x the backbone's rate
HEAD_ONLY_PROXY_LR_MULT = 10  # head-only: proxies at 10x the head's rate
WEIGHT_DECAY = 1e-4
FREEZE_EPOCHS = 1
WARMUP_EPOCHS = 1
VAL_IMAGES = 3000
TUNE_HOLDOUT = 0.2  # `index build --tune`: share of each class held out to pick the epoch and calibrate
TRAIN_FRACTION = 1.0
# `index build` tunes a head by default on labelled collections with at least this many photos per class
# (a fifth are held out: one per class at least picks the epoch and calibrates).
MIN_PER_CLASS_TO_TUNE = 5

# --- serving -------------------------------------------------------------------------------------------
HOST = "127.0.0.1"
PORT = 8000
MAX_UPLOAD_MB = 20.0
SERVE_MAX_K = 200  # a page shows at most this many cards
THUMB_MAX = 1024
# Uploads: a 48-megapixel phone photo passes; each decode of the largest takes ~150 MB, and at most
# MAX_DECODES run at once, so a burst of huge uploads cannot take the server's memory.
UPLOAD_MAX_PIXELS = 50_000_000
MAX_DECODES = 2
HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive whole (slowloris)
BODY_TIMEOUT = 60.0  # seconds for an upload to arrive whole


def default_workers() -> int:
    """Image decoding workers: one per spare core, at least one so decoding overlaps the network."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# Ray engine: shards queued per worker (one running, one waiting, so no worker waits for the driver), and
# how many times one shard may lose its worker before the run stops.
RAY_SHARDS_IN_FLIGHT = 2
RAY_SHARD_ATTEMPTS = 3

# Audit (carsearch audit, bench's leakage check).
NEAR_DUPLICATE_THRESHOLD = 0.90  # cosine alone; measured on planted pairs, docs/benchmarks.md (audit)
# With the photos at hand (local features, the default), the cosine from which a pair needs no look at its
# photos; pairs below it are near-duplicates only when the photos confirm it (edited copies, below). At
# 0.90 a copy's pair with another photo of its model in the same pose slipped through (planted seed 1).
NEAR_DUPLICATE_THRESHOLD_CONFIRMED = 0.92
# Edited copies (re-posted photos: cropped, downscaled, recompressed, colour-shifted) below the cosine
# threshold, confirmed by local features (eval/edited_copies.py; measured on planted re-posts,
# docs/benchmarks.md, audit): candidates are each photo's first EDITED_COPY_K neighbours at cosine
# >= EDITED_COPY_MIN_COSINE, a copy has >= EDITED_COPY_MIN_INLIERS RANSAC inliers of ORB features
# (EDITED_COPY_FEATURES per photo, scaled to EDITED_COPY_SIDE px)...
EDITED_COPY_K = 3
EDITED_COPY_MIN_COSINE = 0.70
EDITED_COPY_MIN_INLIERS = 15
EDITED_COPY_FEATURES = 500
EDITED_COPY_SIDE = 256
# ... and its pixels agree once aligned: normalised cross-correlation >= EDITED_COPY_MIN_NCC of the two
# grey photos (blurred, at half EDITED_COPY_SIDE) where they overlap. Another photo of the same car from
# the same shoot shares corners (30-100 inliers) but not pixels (NCC 0.4-0.9); an edited copy, 0.99+
# (seed 1 of the planted benchmark).
EDITED_COPY_MIN_NCC = 0.90
# Photos whose features the matcher keeps (least recently used dropped): ~30 KB each.
EDITED_COPY_CACHE = 8192
AUDIT_VOTE_K = 50  # neighbours voting on a photo's label (AUROC of flipped labels rises with k up to
# ~50 on the dev set, flip seed 0: k 10 0.848, 30 0.916, 50 0.940, 60 0.944; docs/benchmarks.md (audit))
# Flagged as likely mislabelled (suspects.txt): mislabel score >= this. Dev set, 5% flipped (seed 0), frozen
# lite0, k 50: 623 flagged, precision 0.377 (7.5x the 5% base rate), recall 0.855; 0.95: 0.141 / 0.982.
AUDIT_MISLABEL_FLAG = 0.99
# A label is judged only when its class has at least this many photos (the photo and 2 others) and some
# labelled neighbour votes; otherwise the audit says "too few examples to judge" instead of "suspect".
AUDIT_MIN_CLASS = 3
AUDIT_OUTLIER_K = 10  # outlier score: similarity to this neighbour
# Up to this many vectors exact (Flat) search costs a few ms per query on a CPU: no reason to approximate
# (index build's automatic choice, and the audit's neighbour search; above it, IVF).
EXACT_SEARCH_MAX = 50_000
AUDIT_EXACT_LIMIT = EXACT_SEARCH_MAX
AUDIT_NPROBE = 16  # IVF cells searched above AUDIT_EXACT_LIMIT
AUDIT_LIST = 50  # photos listed per ranked section (mislabelled, outliers) and groups shown on the page
AUDIT_OUTLIER_IQR = 3.0  # outlier: k-th neighbour similarity below Q1 - 3 IQR (Tukey's far-out fence)
EXACT_COPY_SIMILARITY = 0.9999  # cosine from which two embeddings are the same photo (float noise aside)

# Filtered search (make / model / year).
FILTER_EXACT_LIMIT = 20_000  # allowed ids up to this many: exact search over their stored vectors
FILTER_MAX_EF = 4096  # HNSW efSearch ceiling when a filter leaves out most of the index

# Server batching and batch queries.
SERVE_BATCH = 16  # queries sharing one forward pass at most (1 = no batching)
SERVE_BATCH_WAIT_MS = 5.0  # how long a batch waits for queries still being decoded
SERVE_MAX_QUERIES = 32  # images in one POST /api/search

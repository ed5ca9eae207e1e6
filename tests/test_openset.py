"""Open-set scores and metrics against direct computations."""

import logging
from pathlib import Path

import numpy as np
import pytest

from carsearch.eval.openset import auroc, fpr_at_tpr, kth_similarity, threshold_for_tpr
from carsearch.index.settings import IndexSettings


def _auroc_pairs(known: np.ndarray, unknown: np.ndarray) -> float:
    wins = sum((k > u) + 0.5 * (k == u) for k in known for u in unknown)
    return wins / (len(known) * len(unknown))


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    known = np.round(rng.normal(0.6, 0.1, 80), 2)  # rounding makes ties
    unknown = np.round(rng.normal(0.5, 0.1, 60), 2)
    assert auroc(known, unknown) == pytest.approx(_auroc_pairs(known, unknown), abs=1e-12)
    assert auroc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_threshold_keeps_the_target_share() -> None:
    scores = np.linspace(0, 1, 101)
    t = threshold_for_tpr(scores, 0.95)
    assert np.mean(scores >= t) >= 0.95
    assert np.mean(scores >= t + 1e-9) < 0.95  # the largest such threshold
    assert threshold_for_tpr(scores, 1.0) == 0.0


def test_fpr_at_tpr_direct() -> None:
    known = np.arange(100) / 100  # threshold for 95% TPR is 0.05
    unknown = np.array([0.0, 0.04, 0.05, 0.5])
    assert fpr_at_tpr(known, unknown, 0.95) == pytest.approx(0.5)


def test_kth_similarity() -> None:
    sims = np.array([[0.9, 0.8, 0.7], [0.5, 0.4, -np.inf]])
    assert kth_similarity(sims, 1).tolist() == [0.9, 0.5]
    assert kth_similarity(sims, 3).tolist() == [0.7, -np.inf]
    assert kth_similarity(sims, 4).tolist() == [-np.inf, -np.inf]


def test_low_vote_shares_are_uncertain_with_a_reason(dev_embeddings, dev_heldout, tmp_path) -> None:
    """The vote-share threshold is calibrated at build time (leave-one-out, like the similarity one); on
    other photos of the same classes, answers under it are marked uncertain, with the reason, and are
    right less often than the answers above it; the CLI prints the reason for every unknown/uncertain."""
    from click.testing import CliRunner

    from carsearch.cli import cli
    from carsearch.embed import load_embeddings
    from carsearch.index.build import build_index
    from carsearch.search.searcher import Searcher

    info = build_index([dev_embeddings], tmp_path / "idx", IndexSettings(factory="Flat"))
    cut = info["openset"]["uncertain"]
    assert 0 < cut["share_threshold"] < 1 and cut["right_flagged"] <= 0.06
    assert cut["wrong_flagged"] > cut["right_flagged"]
    held = load_embeddings(dev_heldout)
    results = Searcher.open(tmp_path / "idx").classify(held.vectors)
    answered = [(r, r.label == lab) for r, lab in zip(results, held.labels, strict=True) if not r.unknown]
    flagged = [ok for r, ok in answered if r.uncertain]
    sure = [ok for r, ok in answered if not r.uncertain]
    assert flagged and sure and np.mean(flagged) < np.mean(sure)
    for r in results:
        assert r.uncertain == (not r.unknown and r.confidence < cut["share_threshold"])
        assert (r.reason is not None) == (r.unknown or r.uncertain)
    first = next(i for i, r in enumerate(results) if r.uncertain)
    photo = held.root / held.paths[first]
    out = CliRunner().invoke(cli, ["-q", "classify", "--index", str(tmp_path / "idx"), str(photo)])
    assert out.exit_code == 0, out.output
    assert "uncertain:" in out.output and "vote share" in out.output


def test_a_threshold_on_few_held_out_photos_is_said_to_be_rough(
    dev_embeddings: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A small tuned collection holds out ten photos: the threshold is then little more than the lowest score
    seen, and index build says so; on a hundred it does not."""
    from carsearch import defaults
    from carsearch.embed import load_embeddings
    from carsearch.index.build import build_index
    from carsearch.index.calibrate import calibrate_on_members

    emb = load_embeddings(dev_embeddings)
    build_index([dev_embeddings], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    for n, said in ((10, True), (defaults.MIN_CALIBRATION_PHOTOS, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="carsearch.index.build"):
            info = calibrate_on_members(tmp_path / "idx", emb.ids[:n], emb.vectors[:n], "a test")
        assert info["openset"]["queries"] == n
        assert ("rests on only 10 held-out photos" in caplog.text) is said, caplog.text

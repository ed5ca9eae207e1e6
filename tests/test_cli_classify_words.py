"""`classify`'s words when nothing voted: an unlabelled index or a filter nothing passes is said as such,
never "N neighbours voted" (issue 20 items 2 and 6, the CLI side of the API's `note`)."""

from __future__ import annotations

from carsearch.cli.search import _human_classify


def _answer(neighbors: int, note: str | None) -> dict:
    n = {
        "id": 0,
        "path": "a.jpg",
        "label": "",
        "make": "",
        "model": "",
        "year": "",
        "score": 0.9,
        "display": "",
    }
    return {
        "query": "q.jpg",
        "label": None,
        "confidence": 0.0,
        "top5": [],
        "unknown": False,
        "level": "class",
        "neighbors": [n] * neighbors,
        "error": None,
        "note": note,
        "uncertain": False,
        "reason": None,
    }


def test_an_unlabelled_index_says_nothing_voted() -> None:
    text = _human_classify([_answer(5, "the index holds only 5 images (asked for 20).")])
    assert text.splitlines() == [
        "q.jpg: no vote: none of its 5 nearest cars has a label (`carsearch search` lists them)",
        "   note: the index holds only 5 images (asked for 20).",
    ]
    assert "voted;" not in text


def test_a_filter_nothing_passes_says_so_without_a_vote_count() -> None:
    text = _human_classify([_answer(0, "no indexed car passes the filter: widen or clear it.")])
    assert text.splitlines() == [
        "q.jpg: no answer: no indexed car to vote",
        "   note: no indexed car passes the filter: widen or clear it.",
    ]

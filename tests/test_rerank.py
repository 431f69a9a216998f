"""Consensus reranking: the candidate the neighbours' captions agree with, the beam's own order kept where they
do not care."""

from __future__ import annotations

import pytest

from pipeline.rerank import consensus, rerank
from pipeline.training.scst import CiderD

TRAIN_REFS = {
    10: ["a red circle on the left", "a red circle at the left", "red circle left of the image"],
    11: ["a red circle on the left side", "the red circle is on the left", "a small red circle left"],
    12: ["a blue square on the right", "a blue square at the right", "blue square right of the image"],
    13: ["a green triangle in the middle", "a green triangle at the centre", "green triangle middle"],
}


def test_the_neighbours_pick_the_caption_they_agree_with_over_the_beams_favourite():
    cider = CiderD(TRAIN_REFS)
    candidates = {0: [("a blue square on the right", -0.1), ("a red circle on the left", -0.4)]}
    assert rerank(candidates, {0: [10, 11]}, cider, weight=0.0) == {0: 1}
    assert consensus("a red circle on the left", [10, 11], cider) > consensus("a blue square on the right",
                                                                              [10, 11], cider)
    # a large weight on the model's score gives the beam's favourite back
    assert rerank(candidates, {0: [10, 11]}, cider, weight=100.0) == {0: 0}


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_ties_keep_the_beams_order(weight):
    cider = CiderD(TRAIN_REFS)
    unrelated = {0: [("zebra", -1.0), ("giraffe", -1.0)]}  # no n-gram shared with any neighbour: consensus 0
    assert rerank(unrelated, {0: [12]}, cider, weight) == {0: 0}
    many = {i: [("a green triangle", -0.5), ("a blue square", -0.2), ("a red circle", -0.9)] for i in range(3)}
    chosen = rerank(many, {0: [10], 1: [12], 2: [13]}, cider, weight)
    assert chosen == {0: 2, 1: 1, 2: 0}

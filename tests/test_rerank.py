"""Consensus reranking: the candidate the neighbours' captions agree with, the beam's own order kept where they
do not care."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.rerank import Neighbours, consensus, load_neighbours, rerank, save_neighbours
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


def test_saved_neighbours_load_back_as_plain_arrays_and_a_bad_file_is_named(tmp_path):
    features = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    saved = Neighbours((list(TRAIN_REFS), features), CiderD(TRAIN_REFS), k=2, weight=0.5)
    path = tmp_path / "neighbours.npz"
    save_neighbours(saved, path)
    loaded = load_neighbours(path, k=3, weight=0.0)
    assert loaded.train[0] == [10, 11, 12, 13] and torch.equal(loaded.train[1], features)
    assert loaded.cider.references == TRAIN_REFS and (loaded.k, loaded.weight) == (3, 0.0)
    assert loaded.cider.score("a red circle on the left", 10) == saved.cider.score("a red circle on the left", 10)
    assert [p.name for p in tmp_path.iterdir()] == ["neighbours.npz"]  # written through a renamed temporary

    arrays = dict(np.load(path))
    np.savez(tmp_path / "pickled.npz", **{**arrays, "captions": np.array([object()] * 12, dtype=object)})
    with pytest.raises(ValueError, match=r"pickled.npz: not a reranking neighbours file \(ValueError: Object arr"):
        load_neighbours(tmp_path / "pickled.npz", 2, 0.0)  # never unpickled
    np.savez(tmp_path / "partial.npz", **{k: v for k, v in arrays.items() if k != "keys"})
    with pytest.raises(ValueError, match=r"partial.npz: not a reranking neighbours file \(KeyError"):
        load_neighbours(tmp_path / "partial.npz", 2, 0.0)
    np.savez(tmp_path / "short.npz", **{**arrays, "keys": arrays["keys"][:3]})
    with pytest.raises(ValueError, match=r"short.npz: expected features \(N, C\), keys \(N,\)"):
        load_neighbours(tmp_path / "short.npz", 2, 0.0)
    np.savez(tmp_path / "stray.npz", **{**arrays, "caption_keys": arrays["caption_keys"] + 100})
    with pytest.raises(ValueError, match=r"stray.npz: caption 'a red circle on the left' belongs to image 110"):
        load_neighbours(tmp_path / "stray.npz", 2, 0.0)

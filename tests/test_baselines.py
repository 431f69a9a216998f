"""The nearest-neighbour caption baseline: consensus captions, cosine retrieval, pooled encoder features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.baselines import nearest_images, nearest_neighbour_captions, pooled_features
from pipeline.metrics import consensus_captions

REFS = {
    0: ["a dog runs on the grass", "a dog running on grass", "a brown dog runs on the grass", "sky"],
    1: ["a cat sleeps on a bed", "a cat asleep on the bed", "the kitchen", "a cat sleeps on the bed"],
    2: ["a red bus on a street", "a red bus parked on the street", "a bus on a street"],
    3: ["only one caption here"],
}


def test_the_consensus_caption_is_the_one_most_like_the_others():
    chosen = consensus_captions(REFS)
    assert chosen[0] in REFS[0][:3] and chosen[1] in (REFS[1][0], REFS[1][1], REFS[1][3])
    assert chosen[0] != "sky" and chosen[1] != "the kitchen"  # the outliers are never chosen
    assert chosen[3] == "only one caption here"  # a single reference is kept
    assert set(chosen) == set(REFS)


def test_each_query_gets_the_caption_of_its_most_similar_training_image():
    train = ([10, 11, 12], torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1))
    queries = ([0, 1, 2], torch.nn.functional.normalize(torch.tensor([[0.1, 2.0], [3.0, 0.2], [1.0, 0.9]]), dim=1))
    refs = {10: ["a horse", "a horse in a field"], 11: ["a boat", "a boat"], 12: ["a tree"]}
    assert nearest_neighbour_captions(train, queries, refs) == {0: "a boat", 1: refs[10][0], 2: "a tree"}


class SumChannels(nn.Module):
    """(B, 3, H, W) -> (B, 2, H, W): channel 0 and channel 1 + 2, with a dropout to show eval mode is used."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x.float())
        return torch.stack([x[:, 0], x[:, 1] + x[:, 2]], dim=1)


def test_pooled_features_are_unit_length_region_means_in_loader_order_and_leave_the_mode_alone():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[0, 0] = 3  # only channel 0
    images[1, 1] = 1  # only channels 1 + 2
    images[2, :] = 2  # both, channel 1 + 2 twice as large
    images[3, 0, 0, 0] = 4  # one pixel of channel 0
    loader = [{"images": images[:3], "image_index": torch.tensor([5, 6, 7])},
              {"images": images[3:], "image_index": torch.tensor([8])}]
    encoder = SumChannels().train()
    keys, feats = pooled_features(encoder, loader, torch.device("cpu"))
    assert keys == [5, 6, 7, 8] and encoder.training
    expected = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0], [1.0, 0.0]]), dim=1)
    torch.testing.assert_close(feats, expected)  # dropout at 0.9 in train mode would have changed these


def test_caption_flaws_count_unknown_words_and_repeated_trigrams():
    from pipeline.metrics import caption_flaws

    hyps = {1: "a table with a table with a chair", 2: "a <unk> on a bed", 3: "a dog on a dog bed", 4: "a cat"}
    assert caption_flaws(hyps) == {"captions_with_unk": 1, "captions_with_repeated_3gram": 1}  # "a table with"
    assert caption_flaws(hyps, n=2)["captions_with_repeated_2gram"] == 2  # and "a dog"


def test_nearest_images_are_the_most_similar_training_images_best_first():
    train = ([10, 11, 12, 13], F.normalize(torch.tensor([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]]), dim=1))
    queries = ([0, 1], F.normalize(torch.tensor([[1, 0.05, 0], [0, 0.2, 1]]), dim=1))
    assert nearest_images(train, queries, 2) == {0: [10, 11], 1: [13, 12]}
    assert nearest_images(train, queries, 9)[0] == [10, 11, 12, 13]  # k is capped at the training set

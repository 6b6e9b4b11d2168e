import pytest

from d_fusion.errors import UserError
from d_fusion.pairing import Pair, check_samples_per_prompt, pair_samples


def test_references_are_the_best_quarter_twice_and_bases_the_lower_half():
    samples = ["p"] * 8 + ["q"] * 8
    scores = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.4, 0.7] + [0.5] * 8
    pairs = pair_samples(samples, scores, 8)
    # p ranked: 1 (0.9), 4 (0.8), 7 (0.7), 2 (0.5) | 6 (0.4), 3 (0.3), 5 (0.2), 0 (0.1)
    assert pairs[:4] == [Pair(0, 1, 6), Pair(1, 1, 3), Pair(2, 4, 5), Pair(3, 4, 0)]
    # q: all tied, sample order decides; pairs stay inside the prompt
    assert pairs[4:] == [Pair(4, 8, 12), Pair(5, 8, 13), Pair(6, 9, 14), Pair(7, 9, 15)]


def test_samples_per_prompt_must_be_a_multiple_of_four():
    assert check_samples_per_prompt(2, 2) == 4
    with pytest.raises(UserError, match="multiple of 4"):
        check_samples_per_prompt(3, 2)


def test_scores_must_cover_every_sample():
    with pytest.raises(UserError, match="3 scores for 4 samples"):
        pair_samples(["p"] * 4, [0.1, 0.2, 0.3], 4)

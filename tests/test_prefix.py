"""KV prefix matching over text tokens and whole images."""

from __future__ import annotations

from server.engine.mtmd import ImageKey
from server.engine.prefix import common_prefix_len, n_positions, n_tokens

IMG_A = ImageKey("a", n_pos=64, n_tokens=64)
IMG_B = ImageKey("b", n_pos=64, n_tokens=64)


def test_identical_prompt_leaves_last_token_to_evaluate() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 3]) == 2


def test_prefix_stops_at_first_difference_and_at_other_image() -> None:
    assert common_prefix_len([1, IMG_A, 5, 6], [1, IMG_A, 5, 7, 8]) == 3
    assert common_prefix_len([1, IMG_A, 5], [1, IMG_B, 5, 9]) == 1
    assert common_prefix_len([], [1, 2]) == 0
    assert common_prefix_len([1, 2, 3, 4], [1, 2]) == 1


def test_positions_and_tokens_count_images_whole() -> None:
    mrope_image = ImageKey("m", n_pos=8, n_tokens=64)
    assert n_positions([1, mrope_image, 2]) == 10
    assert n_tokens([1, mrope_image, 2]) == 66

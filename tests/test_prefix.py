"""KV prefix matching over text tokens and whole images."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.engine.mtmd import ImageKey
from server.engine.prefix import (
    KvEntries,
    common_prefix_len,
    longest_match,
    n_positions,
    n_tokens,
)

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


def test_a_new_conversation_takes_an_empty_slot_not_another_conversations_cache() -> None:
    """Sharing the template's first tokens is no reason to wipe a whole conversation: its
    next turn would re-read everything (several sessions on one replica behind a router)."""
    from server.engine.jobs import Slot
    from server.engine.start import best_slot

    template = [1, 2, 3]
    chat_a = [*template, IMG_A, *range(10, 60)]
    slots = [Slot(0, cached=list(chat_a)), Slot(1), Slot(2, cached=list(template))]
    # A new chat: the slot holding just the template prefix (the warm-up's) gains most.
    assert best_slot(slots, [*template, IMG_B, 7], "") == (slots[2], 3)
    # Without that slot, the empty one, not chat A's.
    assert best_slot(slots[:2], [*template, IMG_B, 7], "") == (slots[1], 0)
    # Chat A's next turn goes back to its own cache.
    assert best_slot(slots, [*chat_a, 99, 100], "") == (slots[0], len(chat_a))
    # Another tenant's cache counts for nothing, matched or not.
    assert best_slot(slots[:2], [*chat_a, 99], "other") == (slots[1], 0)


_KEYS = st.one_of(st.integers(0, 50), st.sampled_from(
    [IMG_A, IMG_B, ImageKey("m", n_pos=8, n_tokens=64)]))
_EDITS = st.lists(st.one_of(
    st.tuples(st.just("append"), _KEYS),
    st.tuples(st.just("extend"), st.lists(_KEYS, max_size=5)),
    st.tuples(st.just("truncate"), st.integers(0, 12)),
    st.tuples(st.just("clear"), st.none())), max_size=30)


@given(st.lists(_KEYS, max_size=10), _EDITS)
def test_kv_entries_keep_their_cell_count_through_every_edit(start: list, edits: list) -> None:
    """The scheduler reads `cells` instead of summing the entries every step: it must
    always equal the sum."""
    entries = KvEntries(start)
    for op, arg in edits:
        if op == "append":
            entries.append(arg)
        elif op == "extend":
            entries.extend(arg)
        elif op == "truncate":
            entries.truncate(arg)
        else:
            entries.clear()
        assert entries.cells == n_tokens(entries)


def test_kv_entries_refuse_edits_that_would_skip_the_count() -> None:
    entries = KvEntries([1, IMG_A])
    for edit in (lambda: entries.pop(), lambda: entries.insert(0, 3),
                 lambda: entries.__setitem__(0, 5), lambda: entries.__delitem__(0)):
        with pytest.raises(TypeError):
            edit()
    assert entries.cells == 65


def test_longest_match_picks_the_longest_shared_prefix_above_the_floor() -> None:
    keys = [1, IMG_A, 5, 6, 7]
    candidates = [("short", [1, IMG_A, 9]), ("long", [1, IMG_A, 5, 6, 8]), ("other", [2])]
    assert longest_match(candidates, keys) == ("long", 4)
    assert longest_match(candidates, keys, floor=4) == (None, 4)  # nothing beats the floor
    assert longest_match([], keys) == (None, 0)

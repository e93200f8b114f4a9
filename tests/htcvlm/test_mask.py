"""Every case of Eq. 6 on a small example: X = [V_hy (3); voco (2); W (3)]."""

from __future__ import annotations

import torch

from htcvlm.mask import allowed_hybrid, hybrid_mask, text_segments, to_additive

NV, NC, NT = 3, 2, 3
VIS, VOCO, TEXT = range(0, 3), range(3, 5), range(5, 8)


def test_text_never_attends_visual():
    allowed = allowed_hybrid(NV, NC, NT)
    assert not allowed[5:, :3].any()


def test_isolated_visual_tokens_see_only_themselves():
    allowed = allowed_hybrid(NV, NC, NT, "isolated")
    assert torch.equal(allowed[:3, :3], torch.eye(3, dtype=torch.bool))
    assert not allowed[:3, 3:].any(), "visual tokens precede voco and text: causal blocks the future"


def test_causal_visual_tokens_see_earlier_visual_tokens():
    allowed = allowed_hybrid(NV, NC, NT, "causal")
    assert torch.equal(allowed[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril())


def test_voco_attends_all_visual_and_earlier_voco():
    for mode in ("isolated", "causal"):
        allowed = allowed_hybrid(NV, NC, NT, mode)
        assert allowed[3:5, :3].all()
        assert allowed[3, 3] and not allowed[3, 4] and allowed[4, 3] and allowed[4, 4]
        assert not allowed[3:5, 5:].any(), "voco cannot see the text after it"


def test_text_is_causal_over_voco_and_text():
    allowed = allowed_hybrid(NV, NC, NT)
    assert allowed[5:, 3:5].all()
    assert torch.equal(allowed[5:, 5:], torch.ones(3, 3, dtype=torch.bool).tril())


def test_upper_bound_lets_text_see_visual():
    allowed = allowed_hybrid(NV, NC, NT, text_attends_visual=True)
    assert allowed[5:, :3].all()


def test_additive_form_and_padding():
    mask = hybrid_mask(NV, NC, [3, 1], dtype=torch.float32)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.float32
    blocked = torch.finfo(torch.float32).min
    assert set(mask.unique().tolist()) == {0.0, blocked}
    # row 1 has one real text token: keys 6 and 7 are padding, blocked for every query
    assert (mask[1, 0, :, 6:] == blocked).all()
    # a padding query row still sees voco, so softmax never gets an all-blocked row
    assert (mask[1, 0, 7, 3:5] == 0).all()
    assert torch.equal(to_additive(allowed_hybrid(NV, NC, NT)), hybrid_mask(NV, NC, [NT])[0, 0])


def test_packed_segments_see_the_prefix_and_themselves_only():
    # row 0: segments of 2 and 2 tokens then a padding column, X = [V (3); voco (2); s0 (2); s1 (2); pad]
    mask = hybrid_mask(NV, NC, torch.tensor([[2, 2], [5, 0]]))
    allowed = mask[0, 0] == 0
    assert mask.shape == (2, 1, 10, 10)
    s0, s1 = range(5, 7), range(7, 9)
    for rows in (s0, s1):
        assert allowed[rows, 3:5].all() and not allowed[rows, :3].any()  # voco, never V
    assert torch.equal(allowed[5:7, 5:7], torch.ones(2, 2, dtype=torch.bool).tril())
    assert torch.equal(allowed[7:9, 7:9], torch.ones(2, 2, dtype=torch.bool).tril())
    assert not allowed[7:9, 5:7].any(), "a segment never sees the one before it"
    assert not allowed[:, 9].any(), "padding keys are blocked"
    assert allowed[9, 3:5].all(), "a padding row still sees voco"
    upper = hybrid_mask(NV, NC, torch.tensor([[2, 2]]), text_attends_visual=True)[0, 0] == 0
    assert upper[5:9, :3].all() and not upper[7:9, 5:7].any()
    # one segment per row is the plain mask
    assert torch.equal(hybrid_mask(NV, NC, torch.tensor([[3], [1]])), hybrid_mask(NV, NC, [3, 1]))


def test_text_segments_give_each_column_its_segment_and_offset():
    seg, offset = text_segments(torch.tensor([[2, 3], [4, 0]]))
    assert seg.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, -1]]
    assert offset[0].tolist() == [0, 1, 0, 1, 2] and offset[1, :4].tolist() == [0, 1, 2, 3]


def test_shared_prefix_and_separator():
    """X = [S (2); V_hy (3); sep (1); voco (2); W (3)]: text reads S (or not), voco and itself, never
    V_hy or sep; V_hy and sep read S; sep and voco read everything before them."""
    shared, vis, sep, voco, text = slice(0, 2), slice(2, 5), slice(5, 6), slice(6, 8), slice(8, 11)
    for attends_prefix in (True, False):
        allowed = allowed_hybrid(
            NV, NC, NT, "isolated", n_shared=2, n_separator=1, text_attends_prefix=attends_prefix
        )
        assert allowed.shape == (11, 11)
        assert torch.equal(allowed[shared, shared], torch.ones(2, 2, dtype=torch.bool).tril())
        assert allowed[vis, shared].all() and torch.equal(allowed[vis, vis], torch.eye(3, dtype=torch.bool))
        assert allowed[sep, :6].all() and allowed[voco, :6].all()
        assert not allowed[text, vis].any() and not allowed[text, sep].any()
        assert allowed[text, voco].all() and torch.equal(allowed[text, text], torch.ones(3, 3).tril().bool())
        assert (
            bool(allowed[text, shared].all()) == attends_prefix
            and bool(allowed[text, shared].any()) == attends_prefix
        )
    upper = allowed_hybrid(
        NV, NC, NT, n_shared=2, n_separator=1, text_attends_prefix=False, text_attends_visual=True
    )
    assert upper[text, :8].all(), "the upper bound is plain causal attention for text"
    packed = hybrid_mask(NV, NC, torch.tensor([[1, 2]]), n_shared=2, n_separator=1, text_attends_prefix=False)
    assert packed.shape == (1, 1, 11, 11)
    assert torch.equal(packed[0, 0, :8, :8] == 0, allowed[:8, :8]), (
        "the prefix rows do not depend on the text"
    )

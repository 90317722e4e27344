"""Bubbling Union on a hand-made 3-layer model whose expected schedules are written out by hand."""
import numpy as np
import pytest

from bac.blocks import BlockInfo
from bac.bubbling import block_errors, bubbling_union, top_error_blocks

K = 10
BLOCKS = [BlockInfo(f"l{layer}.{kind}", layer, kind) for layer in range(3) for kind in ("attn", "cross_attn", "ffn")]
ACS = {  # the per-block ACS schedules (input of the union)
    "l0.attn": [0, 5], "l0.cross_attn": [0, 3], "l0.ffn": [0, 2],
    "l1.attn": [0, 6], "l1.cross_attn": [0, 4], "l1.ffn": [0, 7],
    "l2.attn": [0, 1], "l2.cross_attn": [0, 8], "l2.ffn": [0, 4, 6],
}
PLUS_LAST = {name: steps + [9] for name, steps in ACS.items()}  # every block also computes K-1 = 9


def errors_ranking(*top):
    """Errors where ``top`` come first, in that order, and every other block scores lower."""
    errors = {b.name: 0.1 for b in BLOCKS}
    errors.update({name: 1.0 - 0.1 * i for i, name in enumerate(top)})
    return errors


def test_attention_block_gets_ffn_steps_of_its_layer_and_deeper():
    # l1.cross_attn: own [0, 4] + l1.ffn [0, 7] + l2.ffn [0, 4, 6], not l0.ffn's 2 (shallower), + 9
    got = bubbling_union(ACS, BLOCKS, errors_ranking("l1.cross_attn"), n_bubble=1, num_steps=K)
    assert got == {**PLUS_LAST, "l1.cross_attn": [0, 4, 6, 7, 9]}


def test_selected_ffn_unions_itself_and_deeper_ffns():
    # l1.ffn: own [0, 7] + l2.ffn [0, 4, 6] + 9; l0.attn: own [0, 5] + all three FFNs [0, 2, 7, 4, 6] + 9
    got = bubbling_union(ACS, BLOCKS, errors_ranking("l0.attn", "l1.ffn"), n_bubble=2, num_steps=K)
    assert got == {**PLUS_LAST, "l0.attn": [0, 2, 4, 5, 6, 7, 9], "l1.ffn": [0, 4, 6, 7, 9]}


def test_deepest_ffn_only_gets_itself():
    got = bubbling_union(ACS, BLOCKS, errors_ranking("l2.ffn", "l2.attn"), n_bubble=2, num_steps=K)
    assert got == {**PLUS_LAST, "l2.attn": [0, 1, 4, 6, 9]}  # l2.ffn: [0, 4, 6] + 9, as without BUA


def test_only_the_top_n_are_unioned():
    errors = errors_ranking("l0.cross_attn", "l0.attn")
    one = bubbling_union(ACS, BLOCKS, errors, n_bubble=1, num_steps=K)
    assert one == {**PLUS_LAST, "l0.cross_attn": [0, 2, 3, 4, 6, 7, 9]}
    two = bubbling_union(ACS, BLOCKS, errors, n_bubble=2, num_steps=K)
    assert two == {**one, "l0.attn": [0, 2, 4, 5, 6, 7, 9]}


def test_n_zero_only_adds_last_step():
    assert bubbling_union(ACS, BLOCKS, errors_ranking(), n_bubble=0, num_steps=K) == PLUS_LAST


def test_ties_follow_block_order():
    errors = {b.name: 1.0 for b in BLOCKS}
    assert top_error_blocks(BLOCKS, errors, 2) == ["l0.attn", "l0.cross_attn"]
    errors["l2.attn"] = 2.0
    assert top_error_blocks(BLOCKS, errors, 3) == ["l2.attn", "l0.attn", "l0.cross_attn"]


def test_validation():
    errors = errors_ranking()
    with pytest.raises(ValueError, match="n_bubble"):
        bubbling_union(ACS, BLOCKS, errors, n_bubble=10, num_steps=K)
    with pytest.raises(ValueError, match="n_bubble"):
        bubbling_union(ACS, BLOCKS, errors, n_bubble=-1, num_steps=K)
    with pytest.raises(ValueError, match="outside"):
        bubbling_union({**ACS, "l0.ffn": [0, 10]}, BLOCKS, errors, n_bubble=1, num_steps=K)
    with pytest.raises(ValueError, match="l2.ffn"):
        bubbling_union({k: v for k, v in ACS.items() if k != "l2.ffn"}, BLOCKS, errors, 1, K)
    with pytest.raises(ValueError, match="ffn"):
        BlockInfo("x", 0, "mlp")


def test_block_errors_is_mean_pairwise_l1():
    x = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])  # (K=3, D=2): pair distances 1, 3, 2
    assert block_errors({"a": x})["a"] == pytest.approx(2.0)
    xn = np.stack([x, 2 * x], axis=1)  # (K, N=2, D): the second sample's distances are doubled
    assert block_errors({"a": xn})["a"] == pytest.approx(3.0)
    assert block_errors({"a": x[:1]})["a"] == 0.0  # K = 1: no pairs


def test_a_deeper_whole_block_unit_counts_as_an_ffn():
    # a single-stream unit (kind "block") after the three layers: its steps reach the selected attention block
    blocks = BLOCKS + [BlockInfo("single.0", 3, "block")]
    acs = {**ACS, "single.0": [0, 3]}
    got = bubbling_union(acs, blocks, {**errors_ranking("l2.attn"), "single.0": 0.0}, n_bubble=1, num_steps=K)
    assert got["l2.attn"] == [0, 1, 3, 4, 6, 9] and got["single.0"] == [0, 3, 9]

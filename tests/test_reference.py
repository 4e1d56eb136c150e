"""The ground truth itself: the dense masked reference against the brute-force
definition, and the geometry helpers (pair counts, key and query ranges)."""
import pytest
import torch

from nuwa3dna import brute_force_nearby_attention, dense_nearby_attention, nearby_mask
from nuwa3dna.geometry import count_visible, key_range, query_range, resolve_extent
from nuwa3dna.problems import TEST_PROBLEMS, WORKLOADS


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=lambda p: p.id)
def test_dense_matches_brute_force(p, gen):
    q, k, v = p.make(torch.float64, generator=gen)
    ref = brute_force_nearby_attention(q, k, v, p.extent, p.causal)
    out = dense_nearby_attention(q, k, v, p.extent, p.causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", TEST_PROBLEMS + [WORKLOADS["nuwa-image"], WORKLOADS["cross-sketch"]],
                         ids=lambda p: p.id)
def test_pair_count_matches_mask(p):
    assert p.visible_pairs() == int(nearby_mask(p.q_grid, p.kv, p.extent, p.causal).sum())


def test_mask_picture_clipped_at_border():
    # A query in the corner of a 5x5 image sees a clipped 2x2 window for radius 1.
    m = nearby_mask((1, 5, 5), (1, 5, 5), (0, 1, 1)).reshape(25, 5, 5)
    assert m[0].sum() == 4 and m[12].sum() == 9
    assert m[0][:2, :2].all() and not m[0][2:].any()


def test_cross_centres_are_rescaled():
    # q grid 4 wide, kv grid 2 wide: queries 0,1 centre on key 0; queries 2,3 on key 1.
    m = nearby_mask((1, 1, 4), (1, 1, 2), 0)
    assert m.tolist() == [[True, False], [True, False], [False, True], [False, True]]


def test_causal_sees_itself_and_earlier_only():
    m = nearby_mask((2, 2, 2), (2, 2, 2), None, causal=True)
    assert torch.equal(m, torch.ones(8, 8, dtype=torch.bool).tril())


@pytest.mark.parametrize("n,m,e", [(7, 7, 2), (7, 3, 1), (3, 7, 0), (10, 14, 2), (21, 14, 3), (1, 5, 4)])
def test_key_and_query_ranges_agree_with_mask(n, m, e):
    mask = nearby_mask((1, 1, n), (1, 1, m), (0, 0, e))
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            a0, a1 = key_range(lo, hi, n, m, e)
            cols = mask[lo:hi].any(0).nonzero().flatten()
            assert (a0, a1) == (int(cols.min()), int(cols.max()) + 1)
    for a_lo in range(m):
        for a_hi in range(a_lo + 1, m + 1):
            rows = mask[:, a_lo:a_hi].any(1).nonzero().flatten()
            expect = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
            assert query_range(a_lo, a_hi, n, m, e) == expect


def test_resolve_extent():
    assert resolve_extent(None, (3, 5, 7)) == (2, 4, 6)
    assert resolve_extent(2, (3, 5, 7)) == (2, 2, 2)
    assert resolve_extent((0, None, 100), (3, 5, 7)) == (0, 4, 6)


def test_count_visible_causal_matches_mask():
    for grid, ext in [((3, 4, 5), (1, 2, 1)), ((2, 1, 6), (5, 0, 2)), ((4, 3, 3), (0, 1, 1))]:
        e = resolve_extent(ext, grid)
        assert count_visible(grid, grid, e, True) == int(nearby_mask(grid, grid, ext, True).sum())

"""ProbScale selection: the exact DP against brute force, budgets, relevance, baselines."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from moe_slim.dense.probes import ProbeMatrix
from moe_slim.dense.select import (
    all_selections,
    angular_selection,
    block_influence_selection,
    last_layers_selection,
    layer_relevance,
    parse_budget,
    random_selection,
    round_up_budget,
    select_filled,
    select_layers,
)
from moe_slim.errors import MoeSlimError


def _brute(weights, values, cap, contiguous):
    n = len(weights)
    best = -np.inf
    for r in range(1, n + 1):
        for keep in itertools.combinations(range(n), r):
            dropped = [i for i in range(n) if i not in keep]
            if contiguous and dropped and dropped[-1] - dropped[0] + 1 != len(dropped):
                continue
            w = sum(weights[i] for i in keep)
            if w <= cap:
                best = max(best, sum(values[i] for i in keep))
    return best


@pytest.mark.parametrize("contiguous", [False, True])
def test_dp_matches_brute_force_on_hand_made_matrices(contiguous):
    rng = random.Random(0)
    for trial in range(60):
        n = rng.randint(1, 9)
        weights = [rng.choice([3, 5, 8, 13]) if trial % 2 else 10 for _ in range(n)]
        values = [round(rng.uniform(-0.2, 1.0), 3) for _ in range(n)]
        cap = rng.randint(min(weights), sum(weights))
        best = _brute(weights, values, cap, contiguous)
        if best == -np.inf:  # contiguous: no prefix+suffix fits
            with pytest.raises(MoeSlimError):
                select_layers({"decoder": np.array(values)}, {"decoder": weights}, cap, contiguous=contiguous)
            continue
        sel = select_layers({"decoder": np.array(values)}, {"decoder": weights}, cap, contiguous=contiguous)
        keep = sel.keep["decoder"]
        assert sum(weights[i] for i in keep) == sel.params <= cap
        assert sel.value == pytest.approx(sum(values[i] for i in keep))
        assert sel.value == pytest.approx(best), (weights, values, cap)
        if contiguous:
            dropped = [i for i in range(n) if i not in keep]
            assert not dropped or dropped[-1] - dropped[0] + 1 == len(dropped)


def test_hand_made_probe_matrix_known_answer():
    # task-weighted gains per layer: .30, .00, .20, .05, .25 (BI .1 everywhere -> +.0001)
    acc = np.array([[0.40, 0.50], [0.70, 0.80], [0.70, 0.80], [0.90, 1.00], [0.95, 1.05], [1.20, 1.30]])
    pm = ProbeMatrix(["a", "b"], {"a": 1.0, "b": 1.0}, {"decoder": acc}, {"decoder": acc * 0}, {},
                     {"decoder": np.full(5, 0.1)})
    rel = layer_relevance(pm)["decoder"]
    assert rel == pytest.approx([0.3001, 0.0001, 0.2001, 0.0501, 0.2501])
    sizes = {"decoder": [10] * 5}
    assert select_layers({"decoder": rel}, sizes, 30).keep == {"decoder": [0, 2, 4]}
    # contiguous: the dropped layers must be one run, so layer 2's gain cannot be had without 1 and 3
    assert select_layers({"decoder": rel}, sizes, 30, contiguous=True).keep == {"decoder": [0, 3, 4]}
    assert select_layers({"decoder": rel}, sizes, 20, contiguous=True).keep == {"decoder": [0, 4]}


def test_signed_gains_telescope_to_the_last_kept_layer():
    # a probe curve that peaks at row 3 and then declines (late layers trade task information away)
    acc = np.array([[0.5], [0.6], [0.8], [0.9], [0.85], [0.7], [0.68]])
    pm = ProbeMatrix(["t"], {"t": 1.0}, {"decoder": acc}, {"decoder": acc}, {}, {"decoder": np.zeros(6)})
    rel = layer_relevance(pm)["decoder"]
    for k in range(1, 7):  # a kept prefix is worth exactly the score of its last layer
        assert rel[:k].sum() == pytest.approx(acc[k, 0] - acc[0, 0])
    sizes = {"decoder": [1] * 6}
    # with room for everything, the contiguous plan truncates at the peak: P[3] beats P[6] and any suffix
    assert select_layers({"decoder": rel}, sizes, 6, contiguous=True).keep == {"decoder": [0, 1, 2]}
    assert select_layers({"decoder": rel}, sizes, 2, contiguous=True).keep == {"decoder": [0, 1]}


def test_knapsack_uses_layer_sizes_not_counts():
    # a big layer worth a lot less per parameter than two small ones (MoE vs dense layers)
    rel = {"decoder": np.array([0.5, 0.9, 0.5])}
    assert select_layers(rel, {"decoder": [4, 10, 4]}, 10).keep == {"decoder": [0, 2]}
    assert select_layers(rel, {"decoder": [4, 10, 4]}, 14).keep == {"decoder": [0, 1]}


def test_two_stacks_keep_one_layer_each_and_are_optimal():
    rel = {"encoder": np.array([0.1, 0.9, 0.2]), "decoder": np.array([0.05, 0.01])}
    sel = select_layers(rel, {"encoder": [5, 5, 5], "decoder": [5, 5]}, 15)
    assert sel.keep == {"encoder": [1, 2], "decoder": [0]}
    with pytest.raises(MoeSlimError):
        select_layers(rel, {"encoder": [5, 5, 5], "decoder": [5, 5]}, 9)


def test_identity_layers_have_zero_relevance():
    acc = np.array([[0.5], [0.8], [0.8], [0.9], [0.9]])
    bi = np.array([.3, 1e-8, .2, 0])  # float noise of an identity layer counts as nothing
    pm = ProbeMatrix(["t"], {"t": 1.0}, {"decoder": acc}, {"decoder": acc}, {}, {"decoder": bi})
    rel = layer_relevance(pm)["decoder"]
    assert rel[1] == 0 and rel[3] == 0 and rel[0] > 0 and rel[2] > 0
    # even with room for everything, the layers that add nothing are dropped
    assert select_layers({"decoder": rel}, {"decoder": [1] * 4}, 4).keep == {"decoder": [0, 2]}
    # contiguous: only one of the two (non-adjacent) identity layers can go
    assert select_layers({"decoder": rel}, {"decoder": [1] * 4}, 4, contiguous=True).keep["decoder"] in ([0, 1, 2],
                                                                                                      [0, 2, 3])


def test_baselines():
    sizes = {"decoder": [10] * 6}
    bi = {"decoder": np.array([0.5, 0.1, 0.3, 0.05, 0.2, 0.4])}
    assert block_influence_selection(bi, sizes, 30).keep == {"decoder": [0, 2, 5]}
    assert last_layers_selection(sizes, 40).keep == {"decoder": [0, 1, 2, 3]}
    r1, r2 = random_selection(sizes, 30, seed=3), random_selection(sizes, 30, seed=3)
    assert r1.keep == r2.keep and len(r1.keep["decoder"]) == 3
    enc_dec = last_layers_selection({"encoder": [10] * 3, "decoder": [10] * 2}, 30)
    assert enc_dec.keep == {"encoder": [0, 1], "decoder": [0]}


def test_budget_specs():
    lp = {"decoder": [100] * 10}
    assert parse_budget("0.3", lp) == 300
    assert parse_budget("30%", lp) == 300
    assert parse_budget("x4", lp) == 250
    assert parse_budget("3L", lp) == 300
    assert parse_budget("450", lp) == 450
    assert parse_budget("0.45k", lp) == 450
    assert round_up_budget(120, lp) == 200
    for bad in ("0.05", "50", "0", "-1", "lots", "x0"):
        with pytest.raises(MoeSlimError) as exc:
            parse_budget(bad, lp)
        assert "\n" not in str(exc.value)
    with pytest.raises(MoeSlimError, match="below one layer"):
        parse_budget("0.05", lp)


def _brute_filled(weights, values, cap, contiguous):
    """Largest kept size <= cap, then the best value at exactly that size."""
    best = (-1, -np.inf)
    n = len(weights)
    for r in range(1, n + 1):
        for keep in itertools.combinations(range(n), r):
            dropped = [i for i in range(n) if i not in keep]
            if contiguous and dropped and dropped[-1] - dropped[0] + 1 != len(dropped):
                continue
            w = sum(weights[i] for i in keep)
            if w <= cap:
                best = max(best, (w, sum(values[i] for i in keep)))
    return best


@pytest.mark.parametrize("contiguous", [False, True])
def test_filled_selection_is_the_nearest_achievable_plan(contiguous):
    rng = random.Random(7)
    for _ in range(40):
        n = rng.randint(2, 7)
        weights = [rng.choice([3, 5, 8]) for _ in range(n)]
        values = [rng.uniform(-1, 1) for _ in range(n)]
        cap = rng.randint(min(weights), sum(weights))
        w, v = _brute_filled(weights, values, cap, contiguous)
        if w < 0:  # contiguous: no prefix+suffix fits
            with pytest.raises(MoeSlimError):
                select_filled({"decoder": np.array(values)}, {"decoder": weights}, cap, contiguous=True, method="m")
            continue
        sel = select_filled({"decoder": np.array(values)}, {"decoder": weights}, cap, contiguous=contiguous,
                            method="m")
        assert sel.params == w
        assert sel.value == pytest.approx(v)


def test_x3_keeps_a_third_even_when_late_layers_have_negative_relevance():
    # the reported bug: with negative relevance after the probe peak, 'x3' removed 4x (the DP dropped more)
    rel = {"decoder": np.array([0.3, 0.2, 0.1] + [-0.01] * 27)}
    lp = {"decoder": [7] * 30}
    budget = parse_budget("x3", lp)
    assert select_layers(rel, lp, budget, contiguous=True).params < budget  # the old behaviour
    sel = select_filled(rel, lp, budget, contiguous=True, method="probscale-contiguous")
    assert len(sel.keep["decoder"]) == 10 and sel.params == 70
    assert sel.keep["decoder"][:3] == [0, 1, 2]


def test_every_method_is_compared_at_exactly_the_probscale_size():
    n = 12
    acc = np.linspace(0.5, 0.9, n + 1)[:, None]
    acc[8:] = 0.85  # late layers lose a little
    bi = np.linspace(0.4, 0.1, n)
    D = np.abs(np.subtract.outer(np.arange(n + 1), np.arange(n + 1))) * 0.05
    D[6, 10] = 0.01  # layers 6..9 are the most removable block
    pm = ProbeMatrix(["t"], {"t": 1.0}, {"decoder": acc}, {"decoder": acc}, {}, {"decoder": bi}, angular={"decoder": D})
    lp = {"decoder": [10] * n}
    sels = all_selections(pm, lp, parse_budget("x3", lp), seed=1)
    assert set(sels) == {"probscale-contiguous", "probscale-free", "block-influence", "angular", "last-layers",
                         "random"}
    assert {s.params for s in sels.values()} == {40}
    assert all(s.meta["equal_size"] for s in sels.values())
    four = angular_selection({"decoder": D}, lp, 80)
    assert four.keep == {"decoder": [0, 1, 2, 3, 4, 5, 10, 11]}
    assert four.meta["angular_distance"] == pytest.approx(0.01)


def test_budget_that_keeps_every_layer_is_refused():
    lp = {"decoder": [100] * 10}
    for spec in ("1.0", "100%", "x1", "10L", "2000"):
        with pytest.raises(MoeSlimError, match="keeps every layer"):
            parse_budget(spec, lp)


def _matrix(acc: list[float], bi: list[float], n: int) -> ProbeMatrix:
    a = np.asarray(acc, float)[:, None]
    return ProbeMatrix(["t"], {"t": 1.0}, {"layers": a}, {"layers": (a - 0.5) / 0.5}, {"t": 0.5},
                       {"layers": np.asarray(bi, float)}, {"examples": {"t": n}})


def test_probe_gains_within_the_noise_count_as_zero_and_block_influence_decides() -> None:
    """On 40 examples a 2-point gain is noise (standard error of a difference ~0.11): every layer's relevance
    is eps * BI, so the plan keeps the highest-BI layers, not the noisy gains'. On 40,000 it is not."""
    acc = [0.50, 0.52, 0.50, 0.53, 0.55]   # rows: embeddings, then 4 layers
    bi = [0.9, 0.1, 0.5, 0.2]
    from moe_slim.dense.select import RELEVANCE_EPS, gain_noise, significant_gains

    small = _matrix(acc, bi, 40)
    se = gain_noise(small, "layers")
    assert np.allclose(se, np.sqrt(2 * 0.51 * 0.49 / 40), atol=0.01)
    rel = layer_relevance(small)["layers"]
    assert np.allclose(rel, RELEVANCE_EPS * np.asarray(bi))
    assert significant_gains(small) == {"layers": 0}
    sel = select_layers(layer_relevance(small), {"layers": [1, 1, 1, 1]}, 2)
    assert sel.keep == {"layers": [0, 2]}

    large = _matrix(acc, bi, 40000)
    rel = layer_relevance(large)["layers"]
    assert np.allclose(rel, np.diff(acc) + RELEVANCE_EPS * np.asarray(bi))
    assert significant_gains(large) == {"layers": 4}
    assert np.allclose(layer_relevance(small, z=0)["layers"], rel)  # z=0 trusts every gain

"""The reference implementations' own test cases, ported (the cases, not the code), so a reader can see
that our criteria give the same numbers on the same inputs:

* llm-compressor ``tests/llmcompressor/modifiers/pruning/reap/test_base.py``: per-expert REAP saliency
  from given top-k indices, weights and norms (means 1.15 / 0.8 / 2.0 / 0, accumulation across
  batches), the retained set globally ([1, 2, 4, 6, 7]) and per router group ([1, 2, 3, 4, 6, 7]),
  and the correction-bias entries sliced with the router;
* REAP ``tests/test_layerwise_observer.py``: the layer-wise observer equals the standard one on a
  padded batch (padding excluded), batches grouped or not give the same statistics, and the dense
  blocks of a partly-MoE model are run through while only the MoE layers are observed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_slim.experts import criteria
from moe_slim.experts.observe import observe, observe_layerwise
from moe_slim.experts.plan import ExpertPlan, LayerPlan, select
from moe_slim.experts.prune import apply_plan
from moe_slim.experts.recorder import Recorder
from moe_slim.experts.stats import DomainStats
from moe_slim.families import moe_layers
from moe_slim.modeling.dispatch import prepare_model
from moe_slim.modeling.loading import load_model
from moe_slim.modeling.tiny import save_tiny, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recorded(n_experts: int, batches: list[tuple[list[list[int]], list[list[float]], list[list[float]]]]
              ) -> DomainStats:
    """Statistics from (top-k indices, top-k weights, the routed experts' output norms) per batch, through
    the recorder's own path for routed selections."""
    router = torch.nn.Linear(4, n_experts, bias=False)  # the recorder reads the token width from it
    layer = SimpleNamespace(index=0, stack="decoder", router=router, router_weight=router.weight, expert_scale=None)
    rec = Recorder([layer], n_experts)  # type: ignore[list-item]
    rec.begin("calibration")
    for idx, w, norms in batches:
        idx_t, w_t, n_t = torch.tensor(idx), torch.tensor(w), torch.tensor(norms)
        n_tokens, k = idx_t.shape
        tok = torch.arange(n_tokens).repeat_interleave(k)
        rec.record_pairs(layer, tok, idx_t.reshape(-1), w_t.reshape(-1), n_t.reshape(-1), n_tokens)  # type: ignore[arg-type]
    return DomainStats(rec.domains["calibration"])


def test_reap_saliency_from_given_topk_weights_and_norms() -> None:
    # llm-compressor test_update_and_mean: 2 tokens, top-2 of 4 experts, expert 3 never routed
    # norms by (token, slot): expert 0 got 3.0 and 1.0, expert 1 got 2.0, expert 2 got 4.0
    s = _recorded(4, [([[0, 1], [0, 2]], [[0.6, 0.4], [0.5, 0.5]], [[3.0, 2.0], [1.0, 4.0]])])
    expected = torch.tensor([1.15, 0.8, 2.0, 0.0], dtype=torch.float64)  # (0.6*3 + 0.5*1)/2, 0.4*2, 0.5*4, 0
    torch.testing.assert_close(criteria.reap(s)[0], expected)
    torch.testing.assert_close(criteria.reap_weights(s)[0], expected)  # the weights already sum to 1 per token
    assert s.count[0].tolist() == [2.0, 1.0, 1.0, 0.0]


def test_reap_accumulates_across_batches() -> None:
    # llm-compressor test_accumulates_across_batches: (0.6*3 + 0.4*1) / 2 = 1.1 over 2 routed tokens
    s = _recorded(2, [([[0]], [[0.6]], [[3.0]]), ([[0]], [[0.4]], [[1.0]])])
    torch.testing.assert_close(criteria.reap_weights(s)[0], torch.tensor([1.1, 0.0], dtype=torch.float64))
    assert float(s.count[0].sum()) == 2.0
    # REAP since 2026-03-11 renormalises each token's top-k weights: a lone top-1 weight becomes 1
    torch.testing.assert_close(criteria.reap(s)[0], torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_reap_renormalises_topk_weights_that_do_not_sum_to_one() -> None:
    # the first case with every weight halved (a router without norm_topk_prob): REAP's current saliency
    # is unchanged, the model-weight form halves
    s = _recorded(4, [([[0, 1], [0, 2]], [[0.3, 0.2], [0.25, 0.25]], [[3.0, 2.0], [1.0, 4.0]])])
    torch.testing.assert_close(criteria.reap(s)[0], torch.tensor([1.15, 0.8, 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(criteria.reap_weights(s)[0], torch.tensor([0.575, 0.4, 1.0, 0.0], dtype=torch.float64))


def test_retained_experts_globally_and_per_router_group() -> None:
    # llm-compressor test_compute_retained_global: drop the 3 lowest of 8
    scores = torch.tensor([[0.1, 0.5, 0.8, 0.3, 0.7, 0.2, 0.9, 0.4]])
    assert select(scores, [5]) == [[1, 2, 4, 6, 7]]
    # test_compute_retained_per_group: 2 groups of 4, one dropped per group
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.6, 0.2, 0.5, 0.4]])
    assert select(scores, [6], groups=2) == [[1, 2, 3, 4, 6, 7]]


def test_pruning_slices_the_correction_bias_with_the_router() -> None:
    # llm-compressor test_prune_resizes_correction_bias: bias = arange(8), keep [1, 2, 3, 5, 6, 7]
    model = tiny_model("deepseek_v3", seed=0)  # 8 routed experts in 2 router groups, a correction bias
    prepare_model(model)
    layers = moe_layers(model)
    router_before = [l.router_weight.detach().clone() for l in layers]
    for l in layers:
        l.correction_bias.data.copy_(torch.arange(8, dtype=l.correction_bias.dtype))
    keep = [1, 2, 3, 5, 6, 7]
    plan = ExpertPlan("deepseek_v3", 8, 2, [LayerPlan(l.name, keep, [0.0] * 8) for l in layers])
    apply_plan(model, plan)
    for l, before in zip(moe_layers(model), router_before):
        torch.testing.assert_close(l.correction_bias.float(), torch.tensor(keep, dtype=torch.float32))
        torch.testing.assert_close(l.router_weight, before[keep])
        assert l.num_experts == 6
    assert model.config.n_routed_experts == 6


# -- REAP tests/test_layerwise_observer.py --------------------------------------------------------------

TEXTS = {"calibration": ["abc", "de", "fghi", "jkl", "mn", "opqrstu"]}  # unequal lengths: padded batches


@pytest.fixture(scope="module")
def qwen_2x1(tmp_path_factory) -> Path:
    # REAP's case: a Qwen3-MoE with 2 experts, top-1, norm_topk_prob=False
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("q") / "m", num_experts=2, num_experts_per_tok=1,
                     norm_topk_prob=False)


def _assert_same(a, b) -> None:
    for f, t in a.domains["calibration"].items():
        u = b.domains["calibration"][f]
        if f in ("tokens", "count", "coselect"):
            assert torch.equal(t, u), f
        else:
            torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6, msg=f)


def test_layerwise_observer_matches_standard_on_a_padded_batch(qwen_2x1: Path) -> None:
    model, tok = load_model(qwen_2x1)
    settings = dict(seq_len=16, batch_size=2, pack=False)
    standard = observe(model, tok, TEXTS, **settings)
    layerwise = observe_layerwise(qwen_2x1, tok, TEXTS, **settings)
    real = sum(len(tok(t)["input_ids"]) for t in TEXTS["calibration"])
    assert standard.tokens("calibration").tolist() == [real] * standard.n_layers  # padding never counts
    assert layerwise.tokens("calibration").tolist() == [real] * layerwise.n_layers
    _assert_same(standard, layerwise)
    torch.testing.assert_close(criteria.reap(standard.mix()), criteria.reap(layerwise.mix()), rtol=1e-5, atol=1e-6)


def test_grouped_batches_match_a_single_pass(qwen_2x1: Path) -> None:
    _, tok = load_model(qwen_2x1)
    one = observe_layerwise(qwen_2x1, tok, TEXTS, seq_len=16, batch_size=6, pack=False)
    grouped = observe_layerwise(qwen_2x1, tok, TEXTS, seq_len=16, batch_size=1, pack=False)
    _assert_same(one, grouped)


def test_dense_blocks_of_a_partly_moe_model_run_through(tmp_path: Path) -> None:
    path = save_tiny("deepseek_v3", tmp_path / "m")  # layer 0 dense (first_k_dense_replace=1), 1 and 2 MoE
    _, tok = load_model(path)
    stats = observe_layerwise(path, tok, TEXTS, seq_len=16, batch_size=2, pack=False)
    real = sum(len(tok(t)["input_ids"]) for t in TEXTS["calibration"])
    assert [name.split(".")[2] for name in stats.meta["layers"]] == ["1", "2"]
    assert stats.tokens("calibration").tolist() == [real, real]

"""The family table: only what a model's module structure cannot tell.

Most MoE families of transformers 5 need no entry: :mod:`.discover` finds their blocks, routers,
experts, counts and biases from the module tree. An entry here states a routing quirk, a call
convention the structure does not show, or why a family is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .family import NeuronAxis


def _combine_switch(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch: ``experts(hidden, one_hot_dispatch[T,1,E], weights[T,1])`` (capacity already applied)."""
    hidden, dispatch, weights = args[:3]
    return hidden, dispatch[:, 0, :].to(weights.dtype) * weights


def _combine_nllb(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE: ``experts(hidden, top1_mask[T,E], combine_weights[T,E])``.

    The router's combine weights already hold both the top-1 and top-2 gates (zero where capacity
    dropped a token). Fairseq scales expert outputs by ``1 - moe_token_dropout`` at inference.
    """
    hidden, _top1, combine = args[:3]
    if not experts.training and getattr(experts, "moe_token_dropout", 0.0) > 0:
        combine = combine * (1.0 - experts.moe_token_dropout)
    return hidden, combine


def _routing_llama4(router: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-4: the router returns ``(scores[T, E], logits)``, scores the sigmoid of the top-k logits and 0
    elsewhere; the block multiplies each expert's input by its score. The same top-k of the same logits
    gives the router's own choice."""
    scores, logits = output[0], output[1]
    top_k_index = logits.topk(router.top_k, dim=-1).indices
    return top_k_index, scores.gather(-1, top_k_index)


def _count_longcat(module: nn.Module, n: int) -> None:
    """LongCat-Flash: the router's ``n_routed_experts`` and the experts' ``total_experts`` count the
    zero-computation experts too; ``num_experts`` / ``num_routed_experts`` count the real ones."""
    for m in module.modules():
        zero = int(getattr(m, "zero_expert_num", 0) or 0) if hasattr(m, "total_experts") else None
        if zero is not None:
            m.num_routed_experts, m.total_experts = n, n + zero
        elif hasattr(m, "classifier") and hasattr(m, "n_routed_experts"):
            m.n_routed_experts += n - m.num_experts
            m.num_experts = n
            m.top_k = min(m.top_k, m.n_routed_experts)


#: model_type -> Family fields the structure cannot tell (applied over what discovery found).
QUIRKS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        group_applies=lambda c: getattr(c, "topk_method", "greedy") == "group_limited_greedy",
        notes="softmax router; group-limited greedy top-k when topk_method='group_limited_greedy'"),
    "deepseek_v3": dict(group_min_experts=2, notes="sigmoid router with e_score_correction_bias; groups score by their top-2 experts"),
    "deepseek_v4": dict(
        token_table="gate.tid2eid",
        notes="sqrt(softplus) router with correction bias; its first layers are hash-routed (gate.tid2eid: token id "
        "-> experts): pruning remaps a removed expert's entries to a kept one (the plan's remap), merging to its group"),
    "longcat_flash": dict(
        fixed_experts="zero_expert_num", set_count=_count_longcat, scoring="softmax",
        notes="softmax router over the real and the zero-computation (identity) experts (rows E + zero_expert_num, "
        "correction bias too); plans slice the real experts' rows and keep the zero experts' after them"),
    "ernie4_5_moe": dict(scoring="softmax", notes="softmax router; correction bias in gate.moe_statics [1, E]"),
    "afmoe": dict(notes="sigmoid router in a sub-module (router.gate); expert_bias on the block; route_scale"),
    "phimoe": dict(exact_scores=False, notes="sparsemixer routing: weights come from masked softmaxes over the logits"),
    "flint": dict(scoring="sigmoid", notes="sigmoid top-k without a correction bias"),
    "gpt_oss": dict(notes="router bias; expert biases; interleaved gate_up layout [E, H, 2I]"),
    "switch_transformers": dict(
        fixed_top_k=1, top_k_key=None, logits_output=2, combine=_combine_switch,
        expert_neurons=(("wi.weight", NeuronAxis(0)), ("wo.weight", NeuronAxis(1))), expert_down="wo.weight",
        notes="top-1 with expert capacity; experts are modules expert_{i}"),
    "nllb-moe": dict(
        name="nllb_moe", fixed_top_k=2, top_k_key=None, logits_output=2, combine=_combine_nllb,
        expert_neurons=(("fc1.weight", NeuronAxis(0)), ("fc1.bias", NeuronAxis(0)), ("fc2.weight", NeuronAxis(1))),
        expert_down="fc2.weight",
        notes="top-2 with capacity; experts are modules expert_{i}; moe_slim runs the experts with "
        "fairseq's dispatch (transformers 5.x's NllbMoeExperts.forward only ever runs experts 0 and 1)"),
    "llama4_text": dict(
        scoring="sigmoid", logits_output=1, routing=_routing_llama4,
        expert_neurons=(("gate_up_proj", NeuronAxis(1, "halves")), ("down_proj", NeuronAxis(0))),
        notes="sigmoid top-k router beside a shared expert; the experts take router-scaled inputs (f(w x)), "
        "so routing is read from the router and norms are of f(x) on the unscaled token; gate_up_proj [E, H, 2I]"),
    "dbrx": dict(
        flat_experts=True, expert_down="mlp.w2",
        expert_neurons=(("mlp.w1", NeuronAxis(0)), ("mlp.v1", NeuronAxis(0)), ("mlp.w2", NeuronAxis(0))),
        notes="experts stored flat as [E*I, H] matrices (experts.mlp.w1, v1, w2): viewed as [E, I, H], pruned in "
        "blocks of I rows; counts in the nested ffn_config (moe_num_experts, moe_top_k)"),
    "gemma4_text": dict(
        scoring="softmax", selection_biases=(), group_min_experts=1, router_probabilities=True,
        expert_scale="router.per_expert_scale", shared_attrs=("mlp",),
        notes="the decoder layer is the MoE block (a dense MLP beside the experts; attention differs per layer, "
        "per_layer_config); the router returns softmax probabilities, renormalises the top-k and scales each "
        "expert's weight by per_expert_scale, which every gate statistic includes and pruning slices"),
    "zaya": dict(
        router_weight="router_mlp.out_proj.weight", router_extra_rows=1, selection_biases=("gate.balancing_biases",),
        scoring="softmax",
        notes="the router is an MLP whose last linear scores E experts and a skip expert; balancing biases "
        "[E + 1] steer selection only; pruning keeps the skip row, and a chosen skip counts for no expert"),
}
QUIRKS["nllb_moe"] = QUIRKS["nllb-moe"]
QUIRKS["llama4"] = QUIRKS["llama4_text"]
QUIRKS["gemma4"] = QUIRKS["gemma4_text"]

#: model_type -> why moe_slim refuses it (one line, names what is missing).
REFUSED: dict[str, str] = {
    "diffusion_gemma": "a block-diffusion model (DiffusionGemmaForBlockDiffusion: it denoises blocks of tokens, not "
                       "next-token prediction), which calibration and every quality measure of moe_slim assume",
    "ernie4_5_vl_moe": "each layer's text experts (mlp.text_moe) and vision experts (mlp.vision_moe) take their count "
                       "from one config key (moe_num_experts) and are one expert list on disk, so the text experts "
                       "cannot be pruned with the vision experts kept, and text calibration cannot score vision experts",
    "jetmoe": "its attention experts (MoA) share the MLP experts' config keys (num_local_experts, "
              "num_experts_per_tok), so pruning MLP experts alone cannot write a config that loads, and moe_slim "
              "neither observes nor prunes attention experts (nor experts split over input_linear/output_linear)",
}

#: model_type -> why no tiny model of it is tested yet (its default config does not shrink to one that
#: runs). Discovery still applies to real checkpoints; the enumerating test fails once a tiny model runs.
UNTESTED: dict[str, str] = {}


#: Quantization formats (``config.quantization_config.quant_method``) whose expert tensors a rewrite
#: slices without dequantizing, and the on-disk tensors each adds beside the weights. Both keep the
#: experts along the first dimension of every tensor (or one tensor per expert), so pruning copies
#: byte ranges; the quantization block of the config stays valid as it is.
SLICEABLE_QUANTIZATION: dict[str, str] = {
    "mxfp4": "GPT-OSS MXFP4: fused *_blocks [E, rows, groups, 16] and *_scales [E, rows, groups], uint8",
    "fp8": "FP8 with block scales (DeepSeek-V3): weight float8_e4m3fn + weight_scale_inv per expert",
}

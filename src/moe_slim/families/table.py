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


#: model_type -> Family fields the structure cannot tell (applied over what discovery found).
QUIRKS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        group_applies=lambda c: getattr(c, "topk_method", "greedy") == "group_limited_greedy",
        notes="softmax router; group-limited greedy top-k when topk_method='group_limited_greedy'"),
    "deepseek_v3": dict(group_min_experts=2, notes="sigmoid router with e_score_correction_bias; groups score by their top-2 experts"),
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
}
QUIRKS["nllb_moe"] = QUIRKS["nllb-moe"]
QUIRKS["llama4"] = QUIRKS["llama4_text"]

#: model_type -> why moe_slim refuses it (one line, names what is missing).
REFUSED: dict[str, str] = {
    "diffusion_gemma": "a block-diffusion model (DiffusionGemmaForBlockDiffusion: it denoises blocks of tokens, not "
                       "next-token prediction), with Gemma-4's router that scales each expert's weight (per_expert_scale)",
    "ernie4_5_vl_moe": "each layer's text experts (mlp.text_moe) and vision experts (mlp.vision_moe) take their count "
                       "from one config key (moe_num_experts) and are one expert list on disk, so the text experts "
                       "cannot be pruned with the vision experts kept, and text calibration cannot score vision experts",
    "deepseek_v4": "hash-routed layers (gate.tid2eid: token id -> experts) send tokens to fixed experts, so "
                   "removing one strands its tokens, and keeping those layers whole leaves no single expert count "
                   "for the config",
    "dbrx": "experts are stored as [E*I, H] matrices (experts.mlp.w1, v1, w2), not along a leading expert dimension",
    "jetmoe": "experts are split over two modules (input_linear, output_linear) and attention is MoE too",
    "longcat_flash": "the router scores zero-computation experts too (router rows != experts), which a plan cannot slice",
    "zaya": "the router is an MLP with balancing biases, not a weight[E, H]",
    "gemma4": ("the router returns probabilities, not logits, and scales each expert's weight "
               "(per_expert_scale); moe_slim's gate statistics would be wrong"),
}

#: model_type -> why no tiny model of it is tested yet (its default config does not shrink to one that
#: runs). Discovery still applies to real checkpoints; the enumerating test fails once a tiny model runs.
_SHRINK = "its default config shrunk to a tiny model does not run a forward"
UNTESTED: dict[str, str] = {mt: _SHRINK for mt in (
    "bailing_hybrid", "dots1", "dots3_note", "hunyuan_v1_moe", "qwen4_exp")}
UNTESTED.update(dict.fromkeys(("inkling2", "inkling2_loop"), "a tiny checkpoint of it does not reload (negative "
                                                             "embedding size from its default config)"))


#: Quantization formats (``config.quantization_config.quant_method``) whose expert tensors a rewrite
#: slices without dequantizing, and the on-disk tensors each adds beside the weights. Both keep the
#: experts along the first dimension of every tensor (or one tensor per expert), so pruning copies
#: byte ranges; the quantization block of the config stays valid as it is.
SLICEABLE_QUANTIZATION: dict[str, str] = {
    "mxfp4": "GPT-OSS MXFP4: fused *_blocks [E, rows, groups, 16] and *_scales [E, rows, groups], uint8",
    "fp8": "FP8 with block scales (DeepSeek-V3): weight float8_e4m3fn + weight_scale_inv per expert",
}

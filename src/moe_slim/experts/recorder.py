"""Record what every router did, per calibration domain.

The truth is what the router handed to the experts: the indices and weights the experts module
was called with (softmax, sigmoid with correction bias, group-limited top-k, renormalisation and
scaling factors all differ between families, so nothing is re-derived). The router's logits are
taken from its own output for the soft gate mass (the log of its probabilities where it returns those,
Gemma-4). A per-expert scale the router applies after normalising (Gemma-4) stays on every weight; a
skip expert (Zaya: handed over as expert 0 with weight 0) counts for no expert.

Each selected expert's output norm is computed inside the experts' own forward: for fused experts
the module is called once on the ``tokens x top_k`` rows with unit weights (the same work its
grouped kernel does anyway), the norms are read off, and the routing weights are applied after.
Module-style experts (Switch, NLLB) run through :func:`module_experts_forward`, which records as
it dispatches. Experts called with router-scaled inputs and no routing (Llama-4, ``Family.routing``)
are left untouched: routing is read from the router's output, and each selected expert is run once
more, on the unscaled token, so the recorded norm is ``||f(x)||`` as for every other family (the
layer itself adds ``f(w x)``, which for a SwiGLU expert is not ``w f(x)``).

With ``samples=N`` each domain also keeps a deterministic reservoir of at most N tokens per MoE
layer: the layer's input hidden state, the router's logits and the routing weights the experts were
called with (see :class:`moe_slim.experts.samples.Samples`). Merging recomputes expert outputs and
intermediate activations from those inputs.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..families import MoeLayer
from ..modeling.dispatch import prepare_model
from .reservoir import Reservoir
from .samples import Samples
from .stats import empty_domain


class Recorder:
    """Accumulates sufficient statistics while hooks fire; one domain at a time.

    ``samples > 0`` also keeps a :class:`Reservoir` of that many tokens per (domain, layer).
    """

    def __init__(self, layers: list[MoeLayer], n_experts: int, samples: int = 0) -> None:
        self.layers = layers
        self.n_experts = n_experts
        self.n_layers = max((l.index for l in layers), default=-1) + 1
        # the token width, for the output sums (MoNE): the input of the router's first matrix (Zaya's router
        # MLP projects the token down before its last layer scores the experts)
        first = next((p for p in layers[0].router.parameters() if p.dim() == 2), None) if layers else None
        self.hidden = int(first.shape[-1]) if first is not None else 0
        self.domains: dict[str, dict[str, torch.Tensor]] = {}
        self.domain: str | None = None
        self.masks: dict[str, torch.Tensor | None] = {"decoder": None, "encoder": None}
        self.samples = int(samples)
        self.reservoirs: dict[tuple[str, int], Reservoir] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, Reservoir]] = {}
        # position of the current batch's first real token in its domain's stream (None: right after the
        # previous batch); set when batches arrive out of stream order or on several processes
        self.stream_start: int | None = None

    def begin(self, domain: str) -> None:
        self.domain = domain
        if domain not in self.domains:
            self.domains[domain] = empty_domain(self.n_layers, self.n_experts, self.hidden)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything accumulated so far (sums and reservoirs), as named tensors for safetensors."""
        out = {f"sum|{d}|{f}": t for d, fields in self.domains.items() for f, t in fields.items()}
        for (d, li), res in self.reservoirs.items():
            out[f"res|{d}|{li}|position"] = res.position
            out[f"res|{d}|{li}|seen"] = torch.tensor([res.seen])
            out.update({f"res|{d}|{li}|data|{name}": t for name, t in res.data.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state_tensors` of an interrupted run."""
        for key, t in tensors.items():
            kind, d, rest = key.split("|", 2)
            if kind == "sum":
                self.begin(d)
                self.domains[d][rest] = t.clone()
                continue
            li, what, *name = rest.split("|")
            res = self.reservoirs.setdefault((d, int(li)), Reservoir(self.samples, zlib.crc32(str(d).encode())))
            if what == "position":
                res.position = t.clone()
            elif what == "seen":
                res.seen = int(t[0])
            else:
                res.data[name[0]] = t.clone()
        self.domain = None

    def sample_set(self) -> Samples:
        """The token samples gathered so far, as :class:`~moe_slim.experts.samples.Samples`."""
        tensors = {}
        for (domain, li), res in self.reservoirs.items():
            for f, t in res.result().items():
                tensors[Samples.key(domain, li, f)] = t
        return Samples(tensors)

    def _sample_inputs(self, layer: MoeLayer, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """Offer this call's (non-padding) tokens to the layer's reservoir; routing follows in record_pairs."""
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        lg = logits.detach().float().reshape(-1, logits.shape[-1])
        valid = self._valid(layer, x.shape[0], x.device)
        pos = valid.nonzero().squeeze(1) if valid is not None else torch.arange(x.shape[0], device=x.device)
        key = (self.domain, layer.index)
        res = self.reservoirs.get(key)
        if res is None:  # one seed per domain: every layer samples the same token positions
            res = self.reservoirs[key] = Reservoir(self.samples, zlib.crc32(str(self.domain).encode()))
        take, slots = res.plan(pos.numel(), self.stream_start)
        rows = pos[take.to(pos.device)]
        res.put("x", slots, x[rows])
        res.put("logits", slots, lg[rows])
        self._pending[layer.index] = (rows, slots, res)

    def _valid(self, layer: MoeLayer, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        mask = self.masks.get(layer.stack)
        if mask is None:
            return None
        if mask.numel() != n_tokens:
            raise RuntimeError(f"attention mask has {mask.numel()} tokens, layer {layer.name} saw {n_tokens}")
        return mask.to(device)

    def record_router(self, layer: MoeLayer, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """Soft gate mass and token count from the router's logits (and a token sample of its inputs)."""
        if self.domain is None:
            return
        if self.samples and inputs is not None:
            self._sample_inputs(layer, inputs, logits)
        scores = layer.router_scores(logits.detach())[:, : self.n_experts]  # the real experts' mass
        valid = self._valid(layer, scores.shape[0], scores.device)
        if valid is not None:
            scores = scores[valid]
        acc = self.domains[self.domain]
        acc["tokens"][layer.index] += scores.shape[0]
        acc["soft_sum"][layer.index] += scores.sum(0).double().cpu()

    def record_pairs(
        self, layer: MoeLayer, tok: torch.Tensor, exp: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor,
        n_tokens: int, out: torch.Tensor | None = None,
    ) -> None:
        """Selections as (token, expert, routing weight, ||expert output||) quadruples; ``out``: the unweighted
        output vectors of the same selections (summed per expert when the statistics keep output sums)."""
        if self.domain is None:
            return
        pending = self._pending.pop(layer.index, None)
        if pending is not None:  # dense routing weights of the sampled tokens
            rows, slots, res = pending
            sel = exp < self.n_experts
            dense = torch.zeros(n_tokens, self.n_experts, dtype=torch.float32, device=exp.device)
            dense[tok[sel], exp[sel]] = weight[sel].float()
            res.put("route", slots, dense[rows.to(dense.device)])
        # REAP: the token's top-k weights renormalised to sum to 1; a per-expert scale the router applies after
        # its own normalisation (Gemma-4) is the expert's, so it stays on the weight
        base, scale = weight.double(), layer.expert_scale
        if scale is not None:
            scale = scale.detach().double().to(exp.device)[exp.clamp_max(self.n_experts - 1)]
            base = torch.where(scale != 0, base / scale, 0.0)
        per_token = torch.zeros(n_tokens, dtype=torch.float64, device=tok.device).index_add_(0, tok, base)
        rweight = base / per_token[tok].clamp_min(1e-30)
        rweight = rweight * scale if scale is not None else rweight
        valid = self._valid(layer, n_tokens, tok.device)
        if valid is not None:
            keep = valid[tok]
            tok, exp, weight, norm, rweight = tok[keep], exp[keep], weight[keep], norm[keep], rweight[keep]
            out = out[keep] if out is not None else None
        E = self.n_experts
        keep = exp < E  # expert-parallel sentinels never count
        tok, exp, rweight = tok[keep], exp[keep], rweight[keep]
        out = out[keep] if out is not None else None
        weight, norm = weight[keep].double(), norm[keep].double()
        acc = self.domains[self.domain]
        li = layer.index
        ones = torch.ones_like(weight)
        acc["count"][li] += torch.zeros(E, dtype=torch.float64, device=exp.device).index_add_(0, exp, ones).cpu()
        acc["weight_sum"][li] += torch.zeros(E, dtype=torch.float64, device=exp.device).index_add_(0, exp, weight).cpu()
        acc["norm_sum"][li] += torch.zeros(E, dtype=torch.float64, device=exp.device).index_add_(0, exp, norm).cpu()
        acc["wnorm_sum"][li] += (
            torch.zeros(E, dtype=torch.float64, device=exp.device).index_add_(0, exp, weight * norm).cpu()
        )
        if "rwnorm_sum" in acc:
            acc["rwnorm_sum"][li] += torch.zeros(E, dtype=torch.float64, device=exp.device).index_add_(
                0, exp, rweight * norm).cpu()
        mx = torch.zeros(E, dtype=torch.float64, device=exp.device).scatter_reduce_(0, exp, norm, "amax")
        acc["norm_max"][li] = torch.maximum(acc["norm_max"][li], mx.cpu())
        if out is not None and "out_sum" in acc:
            o = out.detach().double()
            acc["out_sum"][li] += torch.zeros(E, o.shape[1], dtype=torch.float64, device=o.device).index_add_(0, exp, o).cpu()
            acc["out_sq_sum"][li] += torch.zeros(E, dtype=torch.float64, device=o.device).index_add_(
                0, exp, norm * norm).cpu()
        onehot = torch.zeros(n_tokens, E, dtype=torch.float32, device=exp.device)
        onehot[tok, exp] = 1.0
        acc["coselect"][li] += (onehot.T @ onehot).double().cpu()


def _fused_observing_forward(layer: MoeLayer, recorder: Recorder, inner: Any) -> Any:
    """An experts forward that records norms and routing, then combines exactly as the module would."""

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *a: Any, **k: Any):
        shape = hidden.shape  # [T, H], or [B, S, H] (DBRX hands its experts the unflattened states)
        n_tokens, top_k = top_k_index.shape
        rows = hidden.reshape(n_tokens, -1).repeat_interleave(top_k, dim=0)
        unit = torch.ones(n_tokens * top_k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        out = inner(rows, *layer.one_per_row(top_k_index.reshape(-1, 1), unit, recorder.n_experts), *a, **k)
        out = out.reshape(n_tokens * top_k, out.shape[-1])  # unweighted
        norms = out.detach().float().norm(dim=-1)
        tok = torch.arange(n_tokens, device=top_k_index.device).repeat_interleave(top_k)
        exp, w = top_k_index.reshape(-1), top_k_weights.detach().reshape(-1).float()
        if layer.family.router_extra_rows:  # Zaya hands a chosen skip expert over as expert 0 with weight 0
            exp = exp.masked_fill(w == 0, recorder.n_experts)  # the sentinel no statistic counts
        recorder.record_pairs(layer, tok, exp, w, norms, n_tokens, out.detach())
        combined = (out.view(n_tokens, top_k, -1) * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(1)
        return combined.to(hidden.dtype).reshape(shape)

    return forward


def _record_prescaled(layer: MoeLayer, recorder: Recorder, router: nn.Module, inputs: torch.Tensor,
                      output: Any) -> None:
    """Routing from the router's output, norms of each selected expert on the unscaled token."""
    if recorder.domain is None:
        return
    top_k_index, top_k_weights = layer.family.routing(router, output)
    x = inputs.detach().reshape(-1, inputs.shape[-1])
    n_tokens, top_k = top_k_index.shape
    tok = torch.arange(n_tokens, device=x.device).repeat_interleave(top_k)
    exp = top_k_index.reshape(-1)
    outs = torch.zeros(tok.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for e in torch.unique(exp).tolist():
            sel = (exp == e).nonzero(as_tuple=True)[0]
            outs[sel] = layer.expert_output(layer.one_expert(e), x[tok[sel]]).float()
    recorder.record_pairs(layer, tok, exp, top_k_weights.detach().reshape(-1).float(), outs.norm(dim=-1), n_tokens,
                          outs)


@contextlib.contextmanager
def observing(model: nn.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Hooks on every router and experts module for the duration of the block."""
    prepare_model(model)
    handles: list[Any] = []
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in recorder.layers:

            def router_hook(module: nn.Module, args: Any, kwargs: Any, output: Any, layer: MoeLayer = layer) -> None:
                inputs = args[0] if args else next(iter(kwargs.values()), None)
                recorder.record_router(layer, layer.router_logits(output), inputs)
                if layer.family.routing is not None:
                    _record_prescaled(layer, recorder, module, inputs, output)

            handles.append(layer.router.register_forward_hook(router_hook, with_kwargs=True))
            experts = layer.experts
            if layer.family.routing is not None:
                continue
            if layer.family.layout == "modules":
                experts._moe_slim_recorder = recorder
            else:
                had = "forward" in experts.__dict__
                patched.append((experts, experts.__dict__.get("forward") if had else None))
                experts.forward = _fused_observing_forward(layer, recorder, experts.forward)
        yield recorder
    finally:
        for h in handles:
            h.remove()
        for experts, previous in patched:
            if previous is None:
                del experts.forward
            else:
                experts.forward = previous
        for layer in recorder.layers:
            if hasattr(layer.experts, "_moe_slim_recorder"):
                del layer.experts._moe_slim_recorder

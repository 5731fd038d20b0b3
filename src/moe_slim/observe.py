"""Record what every router did, per calibration domain.

The truth is what the router handed to the experts: the indices and weights the experts module
was called with (softmax, sigmoid with correction bias, group-limited top-k, renormalisation and
scaling factors all differ between families, so nothing is re-derived). The router's logits are
taken from its own output for the soft gate mass.

Each selected expert's output norm is computed inside the experts' own forward: for fused experts
the module is called once on the ``tokens x top_k`` rows with unit weights (the same work its
grouped kernel does anyway), the norms are read off, and the routing weights are applied after.
Module-style experts (Switch, NLLB) run through :func:`module_experts_forward`, which records as
it dispatches.

With ``samples=N`` each domain also keeps a deterministic reservoir of at most N tokens per MoE
layer: the layer's input hidden state, the router's logits and the routing weights the experts were
called with (see :class:`moe_slim.stats.Samples`). Merging recomputes expert outputs and
intermediate activations from those inputs.
"""

from __future__ import annotations

import contextlib
import time
import types
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import MoeSlimError
from .families import MoeLayer, check_uniform, family_of, moe_layers
from .fingerprint import library_versions, model_fingerprint
from .stats import SAMPLE_FIELDS, RouterStats, Samples, empty_domain


class Reservoir:
    """A deterministic uniform sample of at most ``cap`` rows of a stream (Algorithm R, seeded).

    Row ``g`` of the stream (0-based) fills slot ``g`` while ``g < cap``; later it replaces a
    uniformly drawn slot ``j <= g`` when ``j < cap``. The same stream and seed give the same sample.
    """

    def __init__(self, cap: int, seed: int) -> None:
        self.cap = int(cap)
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.data: dict[str, torch.Tensor] = {}

    def plan(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``n`` new rows enter the sample (their positions) and the slots they take."""
        g = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        j = torch.floor(torch.rand(n, generator=self.gen, dtype=torch.float64) * (g + 1)).long()
        slots = torch.where(g < self.cap, g.long(), j)
        pos = (slots < self.cap).nonzero().squeeze(1)
        slots = slots[pos]
        if pos.numel():  # a slot drawn twice in one call goes to the later row, as if one by one
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.full((uniq.numel(),), -1, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(pos.numel()), "amax")
            last = last.sort().values
            pos, slots = pos[last], slots[last]
        self.seen += n
        return pos, slots

    def put(self, name: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        rows = rows.detach().cpu()
        buf = self.data.get(name)
        need = int(slots.max()) + 1
        if buf is None or buf.shape[0] < need:
            size = min(self.cap, max(need, 2 * (0 if buf is None else buf.shape[0])))
            grown = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype)
            if buf is not None:
                grown[: buf.shape[0]] = buf
            buf = self.data[name] = grown
        buf[slots] = rows

    def result(self) -> dict[str, torch.Tensor]:
        n = min(self.cap, self.seen)
        return {k: v[:n].clone() for k, v in self.data.items()}


class Recorder:
    """Accumulates sufficient statistics while hooks fire; one domain at a time.

    ``samples > 0`` also keeps a :class:`Reservoir` of that many tokens per (domain, layer).
    """

    def __init__(self, layers: list[MoeLayer], n_experts: int, samples: int = 0) -> None:
        self.layers = layers
        self.n_experts = n_experts
        self.n_layers = max((l.index for l in layers), default=-1) + 1
        self.domains: dict[str, dict[str, torch.Tensor]] = {}
        self.domain: str | None = None
        self.masks: dict[str, torch.Tensor | None] = {"decoder": None, "encoder": None}
        self.samples = int(samples)
        self.reservoirs: dict[tuple[str, int], Reservoir] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, Reservoir]] = {}

    def begin(self, domain: str) -> None:
        self.domain = domain
        if domain not in self.domains:
            self.domains[domain] = empty_domain(self.n_layers, self.n_experts)

    def sample_set(self) -> Samples:
        """The token samples gathered so far, as :class:`~moe_slim.stats.Samples`."""
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
        take, slots = res.plan(pos.numel())
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
        scores = layer.router_scores(logits.detach())
        valid = self._valid(layer, scores.shape[0], scores.device)
        if valid is not None:
            scores = scores[valid]
        acc = self.domains[self.domain]
        acc["tokens"][layer.index] += scores.shape[0]
        acc["soft_sum"][layer.index] += scores.sum(0).double().cpu()

    def record_pairs(
        self, layer: MoeLayer, tok: torch.Tensor, exp: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor,
        n_tokens: int,
    ) -> None:
        """Selections as (token, expert, routing weight, ||expert output||) quadruples."""
        if self.domain is None:
            return
        pending = self._pending.pop(layer.index, None)
        if pending is not None:  # dense routing weights of the sampled tokens
            rows, slots, res = pending
            sel = exp < self.n_experts
            dense = torch.zeros(n_tokens, self.n_experts, dtype=torch.float32, device=exp.device)
            dense[tok[sel], exp[sel]] = weight[sel].float()
            res.put("route", slots, dense[rows.to(dense.device)])
        valid = self._valid(layer, n_tokens, tok.device)
        if valid is not None:
            keep = valid[tok]
            tok, exp, weight, norm = tok[keep], exp[keep], weight[keep], norm[keep]
        E = self.n_experts
        keep = exp < E  # expert-parallel sentinels never count
        tok, exp = tok[keep], exp[keep]
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
        mx = torch.zeros(E, dtype=torch.float64, device=exp.device).scatter_reduce_(0, exp, norm, "amax")
        acc["norm_max"][li] = torch.maximum(acc["norm_max"][li], mx.cpu())
        onehot = torch.zeros(n_tokens, E, dtype=torch.float32, device=exp.device)
        onehot[tok, exp] = 1.0
        acc["coselect"][li] += (onehot.T @ onehot).double().cpu()


def _fused_observing_forward(layer: MoeLayer, recorder: Recorder, inner: Any) -> Any:
    """An experts forward that records norms and routing, then combines exactly as the module would."""

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *a: Any, **k: Any):
        n_tokens, top_k = top_k_index.shape
        rows = hidden.repeat_interleave(top_k, dim=0)
        unit = torch.ones(n_tokens * top_k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        out = inner(rows, top_k_index.reshape(-1, 1), unit, *a, **k)  # [T*K, H], unweighted
        norms = out.detach().float().norm(dim=-1)
        tok = torch.arange(n_tokens, device=top_k_index.device).repeat_interleave(top_k)
        recorder.record_pairs(layer, tok, top_k_index.reshape(-1), top_k_weights.detach().reshape(-1).float(),
                              norms, n_tokens)
        combined = (out.view(n_tokens, top_k, -1) * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(1)
        return combined.to(hidden.dtype)

    return forward


def module_experts_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of module-style experts (``expert_{i}``) from the router's dense combine weights.

    Installed on Switch/NLLB experts by :func:`prepare_model`; records when a recorder is attached.
    """
    layer: MoeLayer = self._moe_slim_layer
    hidden, combine = layer.family.combine(self, args, kwargs)
    final = torch.zeros_like(hidden)
    tok, exp = (combine != 0).nonzero(as_tuple=True)
    norms = torch.zeros(tok.shape[0], dtype=torch.float32, device=hidden.device)
    for e in torch.unique(exp).tolist():
        sel = (exp == e).nonzero(as_tuple=True)[0]
        rows = tok[sel]
        out = self[f"expert_{e}"](hidden[rows])
        norms[sel] = out.detach().float().norm(dim=-1)
        final.index_add_(0, rows, (out * combine[rows, e, None].to(out.dtype)).to(final.dtype))
    recorder: Recorder | None = getattr(self, "_moe_slim_recorder", None)
    if recorder is not None:
        recorder.record_pairs(layer, tok, exp, combine[tok, exp].detach().float(), norms, hidden.shape[0])
    return final


def prepare_model(model: nn.Module) -> nn.Module:
    """Install moe_slim's dispatch on module-style experts (a no-op for fused families and dense models)."""
    try:
        family = family_of(model)
    except MoeSlimError:
        return model
    if family.layout != "modules":
        return model
    for layer in moe_layers(model):
        experts = layer.experts
        experts._moe_slim_layer = layer
        if getattr(experts, "_moe_slim_prepared", False):
            continue
        experts.forward = types.MethodType(module_experts_forward, experts)
        experts._moe_slim_prepared = True
    return model


@contextlib.contextmanager
def observing(model: nn.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Hooks on every router and experts module for the duration of the block."""
    prepare_model(model)
    handles: list[Any] = []
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in recorder.layers:
            idx = layer.family.logits_output

            def router_hook(module: nn.Module, args: Any, kwargs: Any, output: Any, layer: MoeLayer = layer,
                            idx: int = idx) -> None:
                inputs = args[0] if args else next(iter(kwargs.values()), None)
                recorder.record_router(layer, output[idx], inputs)

            handles.append(layer.router.register_forward_hook(router_hook, with_kwargs=True))
            experts = layer.experts
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


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batches(
    tokenizer: Any, texts: list[str], *, seq_len: int, batch_size: int, max_tokens: int | None, pack: bool
) -> list[Batch]:
    """Token batches for one domain: packed into full rows, or one text per row with a mask.

    At most ``max_tokens`` real (non-padding) tokens are produced.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    if pack:
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for text in texts:
            if len(stream) >= budget:
                break
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        stream = stream[: int(min(budget, len(stream)))]
        rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    else:
        used = 0
        for text in texts:
            if used >= budget:
                break
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
            ids = ids[: int(min(len(ids), budget - used))]
            if ids:
                rows.append(ids)
                used += len(ids)
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        batches.append(Batch(ids, mask))
    return batches


def _input_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def run_batch(model: nn.Module, batch: Batch, recorder: Recorder | None = None) -> None:
    """One no-grad forward, with the padding masks published to the recorder."""
    device = _input_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if recorder is not None:
        flat = mask.reshape(-1).bool()
        recorder.masks = {"decoder": flat, "encoder": flat}
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    else:
        kwargs["use_cache"] = False
    model(**kwargs)


def observe(
    model: nn.Module,
    tokenizer: Any,
    calibration: dict[str, list[str]],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    progress: bool = False,
    samples: int = 0,
) -> RouterStats:
    """Run calibration text through ``model`` and return per-domain router statistics.

    ``calibration`` maps a domain name (general, math, code, translation or any other) to texts.
    ``max_tokens`` caps real tokens per domain (an int for all, or per domain). ``samples=N`` also
    keeps a token sample of at most N tokens per domain and MoE layer (inputs, router logits,
    routing weights) for expert merging; it costs ``N x hidden`` values per domain and layer.
    """
    if samples < 0:
        raise MoeSlimError(f"samples must be a non-negative number of tokens, not {samples}")
    if not calibration:
        raise MoeSlimError("no calibration text was given")
    layers = moe_layers(model)
    n_experts = check_uniform(layers)
    recorder = Recorder(layers, n_experts, samples=samples)
    batches = {}
    for domain, texts in calibration.items():
        cap = max_tokens.get(domain) if isinstance(max_tokens, dict) else max_tokens
        batches[domain] = make_batches(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=cap, pack=pack)
        if not batches[domain]:
            raise MoeSlimError(f"calibration domain '{domain}' has no text (give a non-empty file)")
    start = time.perf_counter()
    total = sum(len(b) for b in batches.values())
    with torch.no_grad(), observing(model, recorder), tqdm(total=total, disable=not progress, desc="observe") as bar:
        for domain, dbatches in batches.items():
            recorder.begin(domain)
            for batch in dbatches:
                run_batch(model, batch, recorder)
                bar.update(1)
    meta = {
        "family": layers[0].family.name,
        "layers": [l.name for l in layers],
        "num_experts": n_experts,
        "top_k": layers[0].family.top_k(model.config),
        "model_fingerprint": model_fingerprint(model),
        "model_path": str(getattr(model.config, "_name_or_path", "")),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "seq_len": seq_len,
        "pack": pack,
        "tokens_per_domain": {d: float(t["tokens"].max()) for d, t in recorder.domains.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "versions": library_versions(),
    }
    sample_set = None
    if samples:
        sample_set = recorder.sample_set()
        meta["samples"] = {"per_domain": int(samples), "fields": list(SAMPLE_FIELDS),
                           "tokens": {d: int(min(samples, meta["tokens_per_domain"][d])) for d in recorder.domains}}
    return RouterStats(recorder.domains, meta, sample_set)

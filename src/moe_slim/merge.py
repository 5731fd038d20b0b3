"""Expert merging: REAM, HC-SMoE, M-SMoE and plain averaging, into checkpoints that shrink.

Pruning drops what the removed experts knew; merging folds each removed expert into a kept one.
Every method here ends with exactly ``E' = round(E * (1 - ratio))`` experts in every layer: the
experts' tensors, the router's rows and its bias entries are sliced to ``E'`` (unlike the public
REAP merge code, which copies merged weights into every member and leaves the model as large).

A method is a grouping, an alignment, a weighting and a router rule:

=========  =============================================  ==================  ==========  ================
method     grouping                                       alignment           weights     router row
=========  =============================================  ==================  ==========  ================
ream       k most REAP-salient centroids; in saliency     Hungarian on        REAP        centroid
           order each takes up to C-1 most similar        activations +       saliency
           unassigned experts (similarity: gated mean     weight vectors
           outputs and router-logit columns)
hc-smoe    average-linkage clustering of mean outputs     none                frequency   representative
m-smoe     k most frequent experts dominate; the others   weight matching     frequency   dominant
           join the one with the most similar router
           logits
average    as ream (override with ``grouping=``)          none                uniform     centroid
=========  =============================================  ==================  ==========  ================

The "representative" of an HC-SMoE cluster is the member whose mean output is closest to the
cluster's mean (HC-SMoE's own choice). A merged expert always takes the whole router row of its
representative (centroid, dominant): weight row, router bias entry (GPT-OSS, Switch, NLLB) and
DeepSeek-V3's ``e_score_correction_bias`` entry, so the router of every family stays consistent.
Shared experts are never touched. Group-limited routers (DeepSeek) merge within their router groups,
the same number per group, so the groups stay valid.

Which tensor axis of each expert parameter holds the intermediate neurons (and how gate/up are
packed: concatenated halves, GPT-OSS's interleaved pairs) comes from the family table
(:attr:`~moe_slim.families.Family.expert_neurons`); nothing here knows a model class. Expert
outputs and intermediate activations are computed by the experts' own forward (fused experts are
called with a one-expert view whose down projection is swapped for a 0/1 selector to read the
activations; module experts get a pre-hook on their down projection).

Merging needs more than the routed sums: a bounded token sample per layer (inputs, router logits,
routing weights), gathered with ``observe(..., samples=N)`` / ``moe-slim observe --samples 32k``
and stored beside the statistics. ``sequential=True`` instead re-gathers each layer's sample
through the already merged layers before merging it (REAM's sequential mode); it needs the
calibration text.

The decisions are a :class:`MergePlan` (plan kind ``merge``): groups with the representative first,
weights, scores, and a hash of each layer's neuron permutations, which are saved beside it in
``merge_permutations.safetensors``; :func:`apply_merge_plan` replays plan + permutations on the
original model without statistics (``moe-slim merge MODEL --plan plan.json``, or ``moe-slim apply``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .criteria import score
from .errors import MoeSlimError
from .families import Family, MoeLayer, NeuronAxis, check_uniform, family_of, group_size_ok, moe_layers, set_config_counts
from .observe import Recorder, make_batches, observing, prepare_model, run_batch
from .plan import PLAN_FORMAT, ExpertPlan, LayerPlan, check_ratio, read_plan_json
from .prune import slice_layer
from .stats import RouterStats

METHODS: tuple[str, ...] = ("ream", "hc-smoe", "m-smoe", "average")
GROUPINGS: tuple[str, ...] = ("ream", "hc", "msmoe")
PERMUTATIONS_FILE = "merge_permutations.safetensors"
DEFAULT_SAMPLE_TOKENS = 32_000
DEFAULT_ALIGN_TOKENS = 8192
_CHUNK = 2048  # tokens per expert call when recomputing outputs


@dataclass(frozen=True)
class MethodSpec:
    grouping: str  # "ream" | "hc" | "msmoe"
    align: str  # "ream" (activations + weights) | "weights" (weight matching) | "none"
    weighting: str  # "saliency" | "frequency" | "uniform"
    router: str  # which member's router row the merged expert keeps


SPECS: dict[str, MethodSpec] = {
    "ream": MethodSpec("ream", "ream", "saliency", "centroid (most salient member)"),
    "hc-smoe": MethodSpec("hc", "none", "frequency", "representative (member closest to the cluster's mean output)"),
    "m-smoe": MethodSpec("msmoe", "weights", "frequency", "dominant (most frequent member)"),
    "average": MethodSpec("ream", "none", "uniform", "centroid (most salient member)"),
}


# -- plans ------------------------------------------------------------------------------------


@dataclass
class MergeLayerPlan(LayerPlan):
    """One layer: ``keep`` lists the representatives (whose router rows survive), in output order."""

    groups: list[list[int]] = field(default_factory=list)  # per merged expert: members, representative first
    weights: list[list[float]] = field(default_factory=list)  # merge weights, same order, sum to 1
    permutations_sha256: str = ""  # hash of this layer's permutations ("" = identity, no alignment)


@dataclass
class MergePlan(ExpertPlan):
    """Which experts merge into which, with what weights; JSON beside the checkpoint (kind ``merge``).

    ``permutations`` (not in the JSON; in ``merge_permutations.safetensors``) maps a layer index to
    an ``[E, I]`` tensor: row ``m`` is the neuron order that aligns expert ``m`` to its group's
    representative (aligned = expert's neurons taken in that order).
    """

    kind: str = "merge"
    permutations: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("permutations", None)
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergePlan:
        if d.get("format") != PLAN_FORMAT or d.get("kind") != "merge":
            raise MoeSlimError(f"not a moe_slim merge plan (format {d.get('format')!r}, kind {d.get('kind')!r})")
        try:
            layers = [MergeLayerPlan(l["name"], [int(i) for i in l["keep"]], [float(s) for s in l.get("scores", [])],
                                     [[int(i) for i in g] for g in l["groups"]],
                                     [[float(w) for w in ws] for ws in l["weights"]],
                                     str(l.get("permutations_sha256", ""))) for l in d["layers"]]
            return cls(d["family"], int(d["num_experts"]), int(d["top_k"]), layers, "merge", d.get("info", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MoeSlimError(f"merge plan is malformed: missing or bad field {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergePlan:
        """Read ``plan.json`` and the permutations file beside it (checked against the plan's hashes)."""
        p = Path(path)
        plan = cls.from_dict(read_plan_json(p))
        need = [i for i, l in enumerate(plan.layers) if l.permutations_sha256]
        if need:
            pf = p.parent / PERMUTATIONS_FILE
            if not pf.is_file():
                raise MoeSlimError(f"merge plan {p} aligns neurons but {pf.name} is not beside it "
                                   "(copy it from the merged checkpoint)")
            perms = {int(k): v for k, v in load_file(str(pf)).items()}
            for i in need:
                if i not in perms or _sha(perms[i]) != plan.layers[i].permutations_sha256:
                    raise MoeSlimError(f"{pf.name} does not match the plan (layer {plan.layers[i].name}); "
                                       "use the files written together")
            plan.permutations = {i: perms[i] for i in need}
        return plan

    def save_permutations(self, path: str | os.PathLike) -> None:
        if self.permutations:
            save_file({str(i): t.to(torch.int32).contiguous() for i, t in self.permutations.items()}, str(path))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


# -- experts as tensors -------------------------------------------------------------------------


def expert_tensors(layer: MoeLayer, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e``'s parameters by name (fused: views ``p[e]``; modules: the sub-module's parameters)."""
    if layer.family.layout == "fused":
        return {name: p[e] for name, p in layer.expert_params().items()}
    return dict(layer.expert_module(e).named_parameters())


def neuron_count(layer: MoeLayer) -> int:
    fam = layer.family
    ax = fam.neuron_axes()[fam.expert_down]
    return int(expert_tensors(layer, 0)[fam.expert_down].shape[ax.axis])


def neuron_rows(t: torch.Tensor, ax: NeuronAxis, n: int) -> torch.Tensor:
    """``[n, F]``: each intermediate neuron's slice of ``t`` (both halves / both pair members together)."""
    m = t.movedim(ax.axis, 0)
    if ax.packing == "halves":
        m = m.reshape(2, n, -1).transpose(0, 1)
    elif ax.packing == "pairs":
        m = m.reshape(n, 2, -1)
    elif ax.packing:
        raise ValueError(f"unknown neuron packing {ax.packing!r}")
    return m.reshape(n, -1)


def permute_neurons(t: torch.Tensor, ax: NeuronAxis, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with its neurons in the order ``perm`` (neuron ``a`` of the result is neuron ``perm[a]``)."""
    n = perm.numel()
    perm = perm.long().to(t.device)
    if ax.packing == "halves":
        idx = torch.cat([perm, perm + n])
    elif ax.packing == "pairs":
        idx = torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    else:
        idx = perm
    return t.index_select(ax.axis, idx)


def weight_features(layer: MoeLayer, e: int, n: int | None = None) -> torch.Tensor:
    """``[I, F]`` float32: every neuron's weights (gate row, up row, down column, neuron biases)."""
    n = n or neuron_count(layer)
    tensors = expert_tensors(layer, e)
    return torch.cat([neuron_rows(tensors[name].detach().float(), ax, n)
                      for name, ax in layer.family.expert_neurons], dim=1)


class ExpertRunner:
    """Runs single experts of one layer on given inputs through the experts' own forward code."""

    def __init__(self, layer: MoeLayer) -> None:
        self.layer = layer
        self.family = layer.family
        self.n = neuron_count(layer)
        self.device = next(layer.experts.parameters()).device

    def _probe(self, e: int, selector_start: int | None = None) -> nn.Module:
        """A one-expert view of fused experts; with a selector, the down projection copies neurons out."""
        experts = self.layer.experts
        probe = copy.copy(experts)
        probe._parameters = dict(experts._parameters)
        axes = self.family.neuron_axes()
        for name, p in self.layer.expert_params().items():
            t = p.detach()[e : e + 1]
            if selector_start is not None:
                if name == self.family.expert_down:
                    t = self._selector(t[0], axes[name], selector_start).unsqueeze(0)
                elif name not in axes:  # output-side bias: added after the down projection
                    t = torch.zeros_like(t)
            probe._parameters[name] = t
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(probe, attr, None), int):
                setattr(probe, attr, 1)
        return probe

    def _selector(self, down: torch.Tensor, ax: NeuronAxis, start: int) -> torch.Tensor:
        sel = torch.zeros_like(down)
        out_size = down.shape[1 - ax.axis]
        cnt = min(out_size, self.n - start)
        neurons = torch.arange(start, start + cnt, device=down.device)
        outs = torch.arange(cnt, device=down.device)
        if ax.axis == 0:
            sel[neurons, outs] = 1
        else:
            sel[outs, neurons] = 1
        return sel

    def _call_fused(self, probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        w = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return type(self.layer.experts).forward(probe, x, idx, w)

    @torch.no_grad()
    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s (unweighted) output on rows ``x`` ``[n, H]``."""
        x = x.to(self.device)
        if self.family.layout == "fused":
            return self._call_fused(self._probe(e), x)
        return self.layer.expert_module(e)(x)

    @torch.no_grad()
    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s intermediate activations (the down projection's input) on ``x``: ``[n, I]``."""
        x = x.to(self.device)
        if self.family.layout == "fused":
            parts = []
            start = 0
            while start < self.n:
                out = self._call_fused(self._probe(e, start), x)
                cnt = min(out.shape[1], self.n - start)
                parts.append(out[:, :cnt])
                start += cnt
            return torch.cat(parts, dim=1)
        module = self.layer.expert_module(e)
        owner = module.get_submodule(self.family.expert_down.rpartition(".")[0])
        seen: list[torch.Tensor] = []
        handle = owner.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            module(x)
        finally:
            handle.remove()
        return seen[0]


# -- grouping ----------------------------------------------------------------------------------


def group_ream(saliency: torch.Tensor, similarity: torch.Tensor, k: int, group_size: int) -> list[list[int]]:
    """REAM pseudo-grouping: the ``k`` most salient experts are centroids; in descending saliency each
    takes up to ``group_size - 1`` of its most similar unassigned experts. Groups: centroid first."""
    E = saliency.numel()
    order = sorted(range(E), key=lambda i: (-float(saliency[i]), i))
    centroids = order[:k]
    owner = [-1] * E
    for c in centroids:
        owner[c] = c
    members: dict[int, list[int]] = {c: [c] for c in centroids}
    for c in centroids:
        if all(o >= 0 for o in owner):
            break
        for j in sorted(range(E), key=lambda j: (-float(similarity[c, j]), j)):
            if len(members[c]) >= group_size:
                break
            if owner[j] < 0:
                owner[j] = c
                members[c].append(j)
    if any(o < 0 for o in owner):
        raise MoeSlimError(f"REAM groups of at most {group_size} experts around {k} centroids cannot hold "
                           f"{E} experts (raise --group-size to at least {-(-E // k)})")
    return [members[c] for c in sorted(centroids)]


def group_hc(mean_out: torch.Tensor, k: int) -> list[list[int]]:
    """HC-SMoE: average-linkage clustering (Euclidean) of the experts' mean outputs into exactly ``k``
    clusters; each cluster's representative is the member closest to the cluster's mean."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    E = mean_out.shape[0]
    if k >= E:
        return [[i] for i in range(E)]
    X = mean_out.double().cpu().numpy()
    labels = cut_tree(linkage(X, method="average", metric="euclidean"), n_clusters=k).reshape(-1)
    groups = []
    for lab in sorted(set(labels.tolist())):
        mem = [i for i in range(E) if labels[i] == lab]
        center = mean_out[mem].double().mean(0)
        dist = (mean_out[mem].double() - center).norm(dim=1)
        rep = mem[int(torch.argmin(dist))]  # ties: the lowest index
        groups.append([rep] + [m for m in mem if m != rep])
    return sorted(groups, key=lambda g: g[0])


def group_msmoe(frequency: torch.Tensor, logits: torch.Tensor, k: int) -> list[list[int]]:
    """M-SMoE: the ``k`` most frequently routed experts dominate; every other expert joins the dominant
    expert whose router-logit column (over the sample tokens) is most similar (cosine)."""
    E = frequency.numel()
    dominant = sorted(range(E), key=lambda i: (-float(frequency[i]), i))[:k]
    cols = torch.nn.functional.normalize(logits.float().T, dim=1)
    sim = cols @ cols.T
    members: dict[int, list[int]] = {d: [d] for d in dominant}
    for j in range(E):
        if j in members:
            continue
        best = max(dominant, key=lambda d: (float(sim[j, d]), -d))
        members[best].append(j)
    return [members[d] for d in sorted(dominant)]


def ream_similarity(gated_mean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """REAM's expert similarity in [0, 1]: the mean of (cos(gated mean outputs) + 1) / 2 and the
    router-logit similarity 1 - d / max d (d: Euclidean distance of row-normalised logit columns)."""
    m = torch.nn.functional.normalize(gated_mean.double(), dim=1)
    sim_out = (m @ m.T + 1) / 2
    cols = torch.nn.functional.normalize(logits.double().T, dim=1)
    d = torch.cdist(cols, cols)
    sim_gate = 1 - d / d.max().clamp_min(1e-12)
    return (sim_out + sim_gate) / 2


def _within_router_groups(n_experts: int, n_group: int, k: int, fn: Callable[[list[int], int], list[list[int]]]
                          ) -> list[list[int]]:
    """Run a grouping inside each router group (DeepSeek), ``k / n_group`` merged experts per group."""
    size, per = n_experts // n_group, k // n_group
    out: list[list[int]] = []
    for g in range(n_group):
        idx = list(range(g * size, (g + 1) * size))
        out += [[idx[i] for i in grp] for grp in fn(idx, per)]
    return out


# -- merging ------------------------------------------------------------------------------------


def align(cost: torch.Tensor) -> torch.Tensor:
    """The neuron order of the member that minimises ``sum cost[a, perm[a]]`` (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def ream_cost(act_c: torch.Tensor, act_m: torch.Tensor, w_c: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
    """REAM alignment cost: distances of normalised activation columns plus of normalised weight rows."""
    a_c = torch.nn.functional.normalize(act_c.float().T, dim=1)
    a_m = torch.nn.functional.normalize(act_m.float().T, dim=1)
    w_c = torch.nn.functional.normalize(w_c.float(), dim=1)
    w_m = torch.nn.functional.normalize(w_m.float(), dim=1)
    return torch.cdist(a_c, a_m) + torch.cdist(w_c, w_m)


def weight_matching_cost(w_c: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
    """Weight matching (M-SMoE, Git Re-Basin): maximise the inner products of matched neurons."""
    return -(w_c.float() @ w_m.float().T)


@torch.no_grad()
def merge_layer(layer: MoeLayer, groups: list[list[int]], weights: list[list[float]],
                permutations: torch.Tensor | None = None) -> None:
    """Replace one layer's experts by ``len(groups)`` merged experts, in place.

    Merged expert ``j`` is ``sum_m weights[j][m] * align(expert groups[j][m])`` (float32 arithmetic,
    stored in the parameters' dtype); it takes the router row and bias entries of ``groups[j][0]``.
    ``permutations[e]`` is the neuron order of expert ``e`` (None: no alignment).
    """
    axes = layer.family.neuron_axes()
    merged: list[dict[str, torch.Tensor]] = []
    for grp, ws in zip(groups, weights):
        acc: dict[str, torch.Tensor] = {}
        for m, w in zip(grp, ws):
            for name, t in expert_tensors(layer, m).items():
                t = t.detach().float()
                if permutations is not None and name in axes:
                    t = permute_neurons(t, axes[name], permutations[m])
                acc[name] = acc[name] + w * t if name in acc else w * t
        merged.append(acc)
    slice_layer(layer, [g[0] for g in groups])
    for j, acc in enumerate(merged):
        for name, t in expert_tensors(layer, j).items():
            t.data.copy_(acc[name].to(t.dtype))


def _normalise(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]


# -- features from the token sample ----------------------------------------------------------------


@torch.no_grad()
def layer_features(layer: MoeLayer, runner: ExpertRunner, sample: dict[str, torch.Tensor], *, outputs: bool
                   ) -> dict[str, torch.Tensor]:
    """Per-expert mean output, router-gated mean output and sample REAP/frequency (every expert on every token)."""
    x, logits, route = sample["x"], sample["logits"], sample["route"]
    n, E = logits.shape
    feats: dict[str, torch.Tensor] = {
        "frequency": (route > 0).double().sum(0) / max(n, 1),
    }
    if not outputs:
        return feats
    dev = runner.device
    scores = layer.router_scores(logits).to(dev)
    route_d = route.to(dev)
    H = x.shape[1]
    mean = torch.zeros(E, H, dtype=torch.float64, device=dev)
    gated = torch.zeros(E, H, dtype=torch.float64, device=dev)
    wnorm = torch.zeros(E, dtype=torch.float64, device=dev)
    for e in range(E):
        for s in range(0, n, _CHUNK):
            y = runner.output(e, x[s : s + _CHUNK]).float()
            mean[e] += y.sum(0).double()
            gated[e] += (scores[s : s + _CHUNK, e, None] * y).sum(0).double()
            wnorm[e] += (route_d[s : s + _CHUNK, e] * y.norm(dim=-1)).sum().double()
    mean, gated, wnorm = mean.cpu(), gated.cpu(), wnorm.cpu()
    feats.update(mean=mean / max(n, 1), gated=gated / max(n, 1),
                 reap=wnorm / (route > 0).double().sum(0).clamp_min(1))
    return feats


# -- the whole model ---------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@torch.no_grad()
def _gather_layer(model: nn.Module, layer: MoeLayer, batches: dict[str, list[Any]], cap: int) -> Any:
    """Token sample of one layer through the model as it is now; the forward stops after that layer."""
    rec = Recorder([layer], layer.num_experts, samples=cap)

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _StopForward

    handle = layer.block.register_forward_hook(stop)
    try:
        with observing(model, rec):
            for domain, dbatches in batches.items():
                rec.begin(domain)
                for batch in dbatches:
                    try:
                        run_batch(model, batch, rec)
                    except _StopForward:
                        pass
    finally:
        handle.remove()
    return rec.sample_set()


def _check_request(family: Family, config: Any, n_experts: int, k: int, spec: MethodSpec, group_size: int) -> None:
    top_k = family.top_k(config)
    if k < top_k:
        raise MoeSlimError(f"merging {n_experts} experts to {k} per layer leaves fewer than top-k={top_k} "
                           "(use a smaller ratio)")
    why = group_size_ok(family, config, k)
    if why:
        raise MoeSlimError(f"cannot merge to {k} experts per layer: {why}")
    if spec.grouping == "ream":
        if group_size < 1:
            raise MoeSlimError(f"--group-size must be at least 1 (got {group_size})")
        groups = family.groups(config)
        n_group = groups[0] if groups else 1
        per_k, per_e = k // n_group, n_experts // n_group
        if per_k * group_size < per_e:
            raise MoeSlimError(f"REAM groups of at most {group_size} experts around {k} centroids cannot hold "
                               f"{n_experts} experts (use --group-size {-(-per_e // per_k)} or more)")


def method_spec(method: str, grouping: str | None = None) -> MethodSpec:
    if method not in SPECS:
        raise MoeSlimError(f"unknown merge method '{method}' (choose from: {', '.join(METHODS)})")
    spec = SPECS[method]
    if grouping is not None:
        if grouping not in GROUPINGS:
            raise MoeSlimError(f"unknown grouping '{grouping}' (choose from: {', '.join(GROUPINGS)})")
        spec = MethodSpec(grouping, spec.align, spec.weighting, spec.router)
    return spec


def samples_hint(model_path: str = "MODEL") -> str:
    return (f"run `moe-slim observe {model_path} --calib SPEC --samples 32k --out STATS` and merge with those "
            "stats, or merge with --calib")


@torch.no_grad()
def merge_model(
    model: nn.Module,
    stats: RouterStats | None,
    method: str = "ream",
    ratio: float = 0.5,
    *,
    mix: dict[str, float] | None = None,
    group_size: int = 16,
    max_tokens: int = DEFAULT_SAMPLE_TOKENS,
    align_tokens: int = DEFAULT_ALIGN_TOKENS,
    grouping: str | None = None,
    sequential: bool = False,
    calibration: dict[str, list[str]] | None = None,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 8,
    pack: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> MergePlan:
    """Merge the experts of ``model`` in place to ``round(E * (1 - ratio))`` per layer; return the plan.

    ``stats`` must hold token samples (``observe(..., samples=N)``) unless ``sequential``, which
    re-gathers each layer's sample from ``calibration`` texts (with ``tokenizer``) through the
    already merged layers and scores saliency (REAP) and frequency on that sample (``mix=None``:
    equal shares of the domains). ``mix`` weights the calibration domains (saliency, frequency and the
    sample); ``max_tokens`` bounds the sample per layer; ``align_tokens`` the tokens whose
    activations align neurons (REAM); ``group_size`` is REAM's C. ``grouping`` overrides the
    method's grouping (``ream``, ``hc``, ``msmoe``).
    """
    say = log or (lambda msg: None)
    spec = method_spec(method, grouping)
    check_ratio(ratio)
    if max_tokens < 1 or align_tokens < 1:
        raise MoeSlimError("max_tokens and align_tokens must be positive token counts")
    prepare_model(model)
    family = family_of(model)
    layers = moe_layers(model)
    E = check_uniform(layers)
    k = int(round(E * (1.0 - ratio)))
    _check_request(family, model.config, E, k, spec, group_size)
    if sequential:
        if not calibration or tokenizer is None:
            raise MoeSlimError("sequential merging re-runs the calibration text through the merged layers; "
                               "give the calibration text (--calib) and a tokenizer")
    elif stats is None or stats.samples is None:
        raise MoeSlimError("merging needs token samples (layer inputs, router logits) that these statistics lack; "
                           + samples_hint(str(getattr(model.config, "_name_or_path", "") or "MODEL")))
    if stats is not None:
        stats.check_model(model)
    if mix is not None and stats is not None:
        stats._check_domains(mix)
    groups_cfg = family.groups(model.config)
    n_group = groups_cfg[0] if groups_cfg else 1
    started = time.perf_counter()

    sal_all = freq_all = None
    batches: dict[str, list[Any]] = {}
    cap = 0
    if sequential:
        weights = mix or {d: 1.0 for d in calibration}
        missing = [d for d in weights if d not in calibration]
        if missing:
            raise MoeSlimError(f"the calibration text has no domain {', '.join(missing)} (it has: {', '.join(calibration)})")
        total_w = sum(w for w in weights.values() if w > 0)
        for d, w in weights.items():
            if w <= 0:
                continue
            cap_d = max(1, int(max_tokens * w / total_w))
            batches[d] = make_batches(tokenizer, calibration[d], seq_len=seq_len, batch_size=batch_size,
                                      max_tokens=cap_d, pack=pack)
            if not batches[d]:
                raise MoeSlimError(f"calibration domain '{d}' has no text")
            cap = max(cap, cap_d)
    else:
        sal_all = score(stats, "reap", mix=mix)
        freq_all = score(stats, "frequency", mix=mix)

    plan_layers: list[MergeLayerPlan] = []
    permutations: dict[int, torch.Tensor] = {}
    sample_tokens: list[int] = []
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        if sequential:
            sample = _gather_layer(model, layer, batches, cap).take(li, mix, max_tokens, seed)
        else:
            sample = stats.samples.take(li, mix, max_tokens, seed)
        sample_tokens.append(int(sample["x"].shape[0]))
        runner = ExpertRunner(layer)
        need_outputs = spec.grouping in ("ream", "hc") or spec.weighting == "saliency"
        feats = layer_features(layer, runner, sample, outputs=need_outputs)
        if sequential:  # the routed sums describe the unmerged model: score on the re-gathered sample
            frequency = feats["frequency"]
            saliency = feats.get("reap", frequency)
        else:
            saliency, frequency = sal_all[li], freq_all[li]

        if spec.grouping == "ream":
            sim = ream_similarity(feats["gated"], sample["logits"])
            fn = lambda idx, kk: group_ream(saliency[idx], sim[idx][:, idx], kk, group_size)  # noqa: E731
        elif spec.grouping == "hc":
            fn = lambda idx, kk: group_hc(feats["mean"][idx], kk)  # noqa: E731
        else:
            fn = lambda idx, kk: group_msmoe(frequency[idx], sample["logits"][:, idx], kk)  # noqa: E731
        groups = _within_router_groups(E, n_group, k, fn)
        groups.sort(key=lambda g: g[0])

        if spec.weighting == "saliency":
            s = saliency.double().clone()
            pos = s[s > 0]
            s[s <= 0] = float(pos.min()) if pos.numel() else 1.0  # REAM: unused experts still count a little
            weights = [_normalise([float(s[m]) for m in g]) for g in groups]
        elif spec.weighting == "frequency":
            weights = [_normalise([float(frequency[m]) for m in g]) for g in groups]
        else:
            weights = [[1.0 / len(g)] * len(g) for g in groups]

        perms = None
        if spec.align != "none" and any(len(g) > 1 for g in groups):
            n = runner.n
            perms = torch.arange(n).repeat(E, 1)
            x_align = sample["x"][:align_tokens]
            for g in groups:
                if len(g) == 1:
                    continue
                rep = g[0]
                w_rep = weight_features(layer, rep, n)
                act_rep = runner.hidden(rep, x_align) if spec.align == "ream" else None
                for m in g[1:]:
                    w_m = weight_features(layer, m, n)
                    if spec.align == "ream":
                        cost = ream_cost(act_rep, runner.hidden(m, x_align), w_rep, w_m)
                    else:
                        cost = weight_matching_cost(w_rep, w_m)
                    perms[m] = align(cost)
            permutations[li] = perms
        merge_layer(layer, groups, weights, perms)
        scores = saliency if spec.weighting == "saliency" or spec.grouping == "ream" else frequency
        plan_layers.append(MergeLayerPlan(
            layer.name, [g[0] for g in groups], [round(float(v), 8) for v in scores.tolist()],
            [list(g) for g in groups], [[round(w, 8) for w in ws] for ws in weights],
            _sha(perms) if perms is not None else ""))
        say(f"{layer.name}: {E} -> {len(groups)} experts ({sample_tokens[-1]} sample tokens, "
            f"{time.perf_counter() - t0:.1f}s)")

    set_config_counts(model.config, family, k)
    model.config.moe_slim = {"plan": "merge", "method": method, "kept_per_layer": [k] * len(layers)}
    info = {
        "method": method, "grouping": spec.grouping, "alignment": spec.align, "weighting": spec.weighting,
        "router": spec.router, "ratio": ratio, "mix": mix, "group_size": group_size if spec.grouping == "ream" else None,
        "max_tokens": max_tokens, "align_tokens": align_tokens if spec.align == "ream" else None,
        "sequential": sequential, "seed": seed, "sample_tokens_per_layer": sample_tokens,
        "permutations_file": PERMUTATIONS_FILE if permutations else None,
        "stats_fingerprint": stats.meta.get("model_fingerprint") if stats is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return MergePlan(family.name, E, family.top_k(model.config), plan_layers, info=info, permutations=permutations)


def validate_merge_plan(plan: MergePlan, model: nn.Module) -> list[MoeLayer]:
    """One-line errors for a merge plan that does not fit ``model``; the model's MoE layers otherwise."""
    family = family_of(model)
    layers = moe_layers(model)
    if plan.family != family.name:
        raise MoeSlimError(f"plan is for family {plan.family}; this model is {family.name}")
    if [l.name for l in layers] != [l.name for l in plan.layers]:
        raise MoeSlimError("plan names other MoE layers than this model has (make the plan on this model)")
    n_now = {l.num_experts for l in layers}
    if n_now != {plan.num_experts}:
        raise MoeSlimError(f"plan was made for {plan.num_experts} experts per layer; this model has {sorted(n_now)} "
                           "(merge the original model)")
    counts = {len(l.groups) for l in plan.layers}
    if len(counts) != 1:
        raise MoeSlimError(f"merge plan has different expert counts per layer ({sorted(counts)})")
    k = counts.pop()
    why = group_size_ok(family, model.config, k)
    if k < family.top_k(model.config) or why:
        raise MoeSlimError(f"merge plan keeps {k} experts per layer, which this router cannot use ({why or 'top-k'})")
    for li, l in enumerate(plan.layers):
        flat = sorted(m for g in l.groups for m in g)
        if flat != list(range(plan.num_experts)) or [g[0] for g in l.groups] != l.keep:
            raise MoeSlimError(f"merge plan for {l.name} does not split the {plan.num_experts} experts into groups")
        if [len(w) for w in l.weights] != [len(g) for g in l.groups]:
            raise MoeSlimError(f"merge plan for {l.name} has weights that do not match its groups")
        if l.permutations_sha256 and li not in plan.permutations:
            raise MoeSlimError(f"merge plan for {l.name} needs its neuron permutations ({PERMUTATIONS_FILE})")
    return layers


@torch.no_grad()
def apply_merge_plan(model: nn.Module, plan: MergePlan) -> nn.Module:
    """Replay a merge plan (with its permutations) on the original model, in place; no statistics needed."""
    prepare_model(model)
    layers = validate_merge_plan(plan, model)
    family = family_of(model)
    for li, (layer, lp) in enumerate(zip(layers, plan.layers)):
        merge_layer(layer, lp.groups, lp.weights, plan.permutations.get(li) if lp.permutations_sha256 else None)
    k = len(plan.layers[0].groups)
    set_config_counts(model.config, family, k)
    model.config.moe_slim = {"plan": "merge", "method": plan.info.get("method"), "kept_per_layer": [k] * len(layers)}
    return model


# -- checkpoints ----------------------------------------------------------------------------------


def merge_card(*, source: str, plan: MergePlan, params_before: int, params_after: int, model: nn.Module,
               stats_info: dict[str, Any] | None = None) -> str:
    """A model card: the method, where its decisions came from, the groups and the sizes."""
    from .fingerprint import library_versions, model_fingerprint

    i = plan.info
    k = len(plan.layers[0].groups)
    lines = [
        "---", "library_name: transformers", "tags: [moe_slim, expert-merging, mixture-of-experts]", "---",
        f"# {Path(str(source)).name} — experts merged with moe_slim ({i.get('method')})", "",
        f"Source checkpoint: `{source}` ({plan.family}, {plan.num_experts} experts per layer, top-{plan.top_k}); "
        f"now {k} experts per layer.", "",
        "## How",
        f"- Method `{i.get('method')}`: grouping `{i.get('grouping')}`, alignment `{i.get('alignment')}`, "
        f"weights `{i.get('weighting')}`; router row of each merged expert: {i.get('router')}",
        f"- Ratio {i.get('ratio')}; calibration mix `{i.get('mix') or 'all observed domains'}`; "
        f"sample tokens per layer {i.get('sample_tokens_per_layer')}; sequential: {i.get('sequential')}",
        f"- Parameters: {params_before:,} before, {params_after:,} after "
        f"({100.0 * (1 - params_after / max(params_before, 1)):.1f}% fewer)", "",
        "| layer | merged groups (representative first) |", "|---|---|",
    ]
    for lp in plan.layers:
        lines.append(f"| `{lp.name}` | {' '.join('+'.join(map(str, g)) for g in lp.groups)} |")
    if stats_info:
        lines += ["", "## Statistics", f"- Domains and tokens: {stats_info.get('tokens_per_domain')}",
                  f"- Gathered on: `{stats_info.get('model_path')}`"]
    lines += [
        "", "## Reproduce",
        f"`plan.json` (groups, weights, scores) and `{PERMUTATIONS_FILE}` (neuron alignments, hashed in the plan) "
        f"are beside this card: `moe-slim apply {source} --plan plan.json --out OUT` (or `moe-slim merge --plan`) "
        "replays the merge on the original checkpoint without statistics (merging needs the original experts' "
        "weights, so it applies to the source checkpoint, not to this one).",
        "", f"Fingerprint of this checkpoint: `{model_fingerprint(model)}`.", f"Libraries: `{library_versions()}`.", "",
    ]
    return "\n".join(lines)


def save_merged(model: nn.Module, tokenizer: Any, out: str | os.PathLike, plan: MergePlan, card: str,
                overwrite: bool = False) -> Path:
    """Model, tokenizer, plan.json, the permutations and the card, written atomically."""
    from .checkpoint import require_writable
    from .outputs import atomic_dir

    require_writable(plan)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "plan.json").write_text(plan.to_json())
        plan.save_permutations(tmp / PERMUTATIONS_FILE)
        (tmp / "README.md").write_text(card)
    return Path(out)


def merge_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "ream",
    ratio: float | None = None,
    stats_path: str | os.PathLike | None = None,
    calib: str | dict[str, list[str]] | None = None,
    plan_path: str | os.PathLike | None = None,
    mix: dict[str, float] | None = None,
    group_size: int = 16,
    max_tokens: int = DEFAULT_SAMPLE_TOKENS,
    align_tokens: int = DEFAULT_ALIGN_TOKENS,
    samples: int | None = None,
    grouping: str | None = None,
    sequential: bool = False,
    seq_len: int = 512,
    batch_size: int = 8,
    data_dir: str = "data",
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> MergePlan:
    """Merge a checkpoint's experts and write the smaller checkpoint (plan, permutations and card beside it).

    Decisions come from saved statistics with samples (``stats_path``), from calibration text observed
    here (``calib``; ``samples`` tokens per domain, default ``max_tokens``), or from a saved merge plan
    (``plan_path``, replayed without statistics).
    """
    from .api import calibration_texts
    from .loading import load_config, load_model
    from .observe import observe
    from .outputs import check_output
    from .prune import count_parameters

    check_output(out, overwrite)
    family_of(load_config(model_path))
    stats = None
    if plan_path is not None:
        plan = MergePlan.load(plan_path)
        model, tok = load_model(model_path)
        before = count_parameters(model)
        apply_merge_plan(model, plan)
    else:
        method_spec(method, grouping)
        if ratio is None:
            raise MoeSlimError("merging needs --ratio (the share of experts removed), or --plan")
        check_ratio(ratio)
        if stats_path is None and calib is None:
            raise MoeSlimError("merging needs --stats (observed with --samples) or --calib text, or a --plan")
        if sequential and calib is None:
            raise MoeSlimError("sequential merging re-runs the calibration text through the merged layers; give --calib")
        if stats_path is not None:
            stats = RouterStats.load(stats_path)
            if stats.samples is None and not sequential:
                raise MoeSlimError(f"the statistics in {stats_path} have no token samples, which merging needs; "
                                   + samples_hint(str(model_path)))
        texts = None
        if calib is not None:
            texts, _budget = calibration_texts(calib, data_dir)
        model, tok = load_model(model_path)
        if tok is None and calib is not None:
            raise MoeSlimError(f"{model_path} has no tokenizer; merging with --calib needs one to read the text")
        before = count_parameters(model)
        if stats is None and not sequential:
            stats = observe(model, tok, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=_budget,
                            samples=samples or max_tokens)
        plan = merge_model(model, stats, method, ratio, mix=mix, group_size=group_size, max_tokens=max_tokens,
                           align_tokens=align_tokens, grouping=grouping, sequential=sequential, calibration=texts,
                           tokenizer=tok, seq_len=seq_len, batch_size=batch_size, seed=seed, log=log)
        plan.info.update(stats_path=str(stats_path) if stats_path else None,
                         calibration=calib if isinstance(calib, str) else ("in-memory" if calib else None))
    after = count_parameters(model)
    plan.info.update(params_before=before, params_after=after, source=str(model_path))
    card = merge_card(source=str(model_path), plan=plan, params_before=before, params_after=after, model=model,
                      stats_info=stats.meta if stats is not None else None)
    save_merged(model, tok, out, plan, card, overwrite=overwrite)
    return plan

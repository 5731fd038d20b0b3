"""RouterStats: what every router did, as per-domain sufficient statistics.

Everything stored is a sum, a count or a max, kept separately for each calibration domain, so

* statistics of any mix of domains are a weighted sum (a sweep over N mixes needs one pass);
* two observation runs on disjoint text add up exactly (``a + b``);
* means and ratios are computed at scoring time (see :mod:`moe_slim.experts.criteria`), never stored.

On disk a stats directory holds ``stats.safetensors`` (tensors named ``<domain>/<field>``) and
``meta.json`` (model fingerprint, layer names, tokens per domain, tokenizer, versions).

Optionally (``observe(..., samples=N)``) it also holds ``samples.safetensors``: a bounded token
sample per domain and MoE layer (:class:`Samples`) that expert merging needs beyond the sums. These
are the only non-sum statistics; they never enter :meth:`RouterStats.mix` or the criteria.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import MoeSlimError
from ..outputs import atomic_dir, pause_point
from .samples import SAMPLES_FILE, SAMPLES_FORMAT, Samples

FORMAT = "moe_slim.stats/1"
# [layer, expert] sums
SUM_FIELDS: tuple[str, ...] = (
    "count",  # times selected
    "weight_sum",  # sum of routing weights when selected
    "soft_sum",  # sum of the router's normalised score over all tokens
    "norm_sum",  # sum of ||expert output|| when selected
    "wnorm_sum",  # sum of weight * ||expert output|| when selected
)
# optional sums (stats files written before them lack them; criteria that need them say so):
# out_sum [layer, expert, hidden]: sum of the expert's (unweighted) output vectors when selected;
# out_sq_sum [layer, expert]: sum of ||expert output||^2 when selected (MoNE: mean output and its variance)
OPTIONAL_FIELDS: tuple[str, ...] = ("out_sum", "out_sq_sum")
# rwnorm_sum [layer, expert]: sum of w / (sum of the token's top-k w) * ||expert output|| when selected: REAP's
# renormalised routing weight (REAP since 2026-03-11); stats files written before it lack it
RENORM_FIELDS: tuple[str, ...] = ("rwnorm_sum",)
MAX_FIELDS: tuple[str, ...] = ("norm_max",)  # [layer, expert] max of ||expert output||
PAIR_FIELDS: tuple[str, ...] = ("coselect",)  # [layer, expert, expert] tokens that selected both
TOKEN_FIELD = "tokens"  # [layer] tokens seen (padding excluded)
ALL_FIELDS = (TOKEN_FIELD, *SUM_FIELDS, *MAX_FIELDS, *PAIR_FIELDS)


def empty_domain(n_layers: int, n_experts: int, hidden: int = 0) -> dict[str, torch.Tensor]:
    """Zeroed statistics of one domain (float64, so sums stay exact for any realistic count).

    ``hidden > 0`` also keeps the output sums (``out_sum``: ``L x E x hidden`` float64 per domain)."""
    d = {TOKEN_FIELD: torch.zeros(n_layers, dtype=torch.float64)}
    for f in (*SUM_FIELDS, *RENORM_FIELDS, *MAX_FIELDS):
        d[f] = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    d["coselect"] = torch.zeros(n_layers, n_experts, n_experts, dtype=torch.float64)
    if hidden > 0:
        d["out_sum"] = torch.zeros(n_layers, n_experts, hidden, dtype=torch.float64)
        d["out_sq_sum"] = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    return d


@dataclass
class DomainStats:
    """Statistics of one domain or of a mix of domains: the input of every criterion."""

    tensors: dict[str, torch.Tensor]
    label: str = ""

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @property
    def n_layers(self) -> int:
        return int(self.tensors[TOKEN_FIELD].shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.tensors["count"].shape[1])


@dataclass
class RouterStats:
    """Per-domain router statistics of one model."""

    domains: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    samples: Samples | None = None  # token samples for merging (observe(..., samples=N)), or None

    # -- shape -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.meta["layers"])

    @property
    def n_experts(self) -> int:
        return int(self.meta["num_experts"])

    def has_outputs(self) -> bool:
        """Whether every domain holds the output sums (MoNE's mean outputs); stats from before them do not."""
        return bool(self.domains) and all(all(f in t for f in OPTIONAL_FIELDS) for t in self.domains.values())

    def tokens(self, domain: str) -> torch.Tensor:
        return self.domains[domain][TOKEN_FIELD]

    # -- algebra -----------------------------------------------------------------------------
    def weighted_sum(self, coeffs: dict[str, float | torch.Tensor], label: str = "") -> DomainStats:
        """``sum_d coeffs[d] * stats[d]`` for the sum fields; max over the domains used for maxima.

        A coefficient may be a scalar or a per-layer tensor ``[L]``.
        """
        self._check_domains(coeffs)
        out: dict[str, torch.Tensor] = {}
        optional = [f for f in (*OPTIONAL_FIELDS, *RENORM_FIELDS) if all(f in self.domains[d] for d in coeffs)]
        for f in (TOKEN_FIELD, *SUM_FIELDS, *PAIR_FIELDS, *optional):
            acc = None
            for d, c in coeffs.items():
                t = self.domains[d][f]
                c_t = torch.as_tensor(c, dtype=torch.float64)
                if c_t.dim() == 1:
                    c_t = c_t.view(-1, *([1] * (t.dim() - 1)))
                term = c_t * t
                acc = term if acc is None else acc + term
            out[f] = acc
        for f in MAX_FIELDS:
            used = [self.domains[d][f] for d, c in coeffs.items() if torch.as_tensor(c).abs().sum() > 0]
            out[f] = torch.stack(used).amax(0) if used else torch.zeros_like(out["count"])
        return DomainStats(out, label or ",".join(f"{d}={_fmt(c)}" for d, c in coeffs.items()))

    def mix(self, weights: dict[str, float] | None = None) -> DomainStats:
        """Statistics of a calibration mixture in which domain ``d`` supplies a share ``w_d`` of tokens.

        Each domain is rescaled to the same token count before weighting, so a mix does not depend
        on how much text each domain happened to have. ``None`` (or weights proportional to the
        observed token counts) gives the plain sum over all domains.
        """
        if weights is None:
            return self.weighted_sum({d: 1.0 for d in self.domains}, label="all")
        self._check_domains(weights)
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise MoeSlimError(f"mix weights must be non-negative and not all zero (got {weights})")
        total_w = sum(weights.values())
        t_mix = sum(self.tokens(d) for d in weights)
        coeffs = {}
        for d, w in weights.items():
            t_d = self.tokens(d)
            coeffs[d] = torch.where(t_d > 0, (w / total_w) * t_mix / t_d.clamp_min(1), torch.zeros_like(t_d))
        label = ",".join(f"{d}={_fmt(w)}" for d, w in weights.items())
        return self.weighted_sum(coeffs, label=label)

    def __add__(self, other: RouterStats) -> RouterStats:
        """Statistics of two runs on disjoint text: sums add, maxima take the max."""
        if self.meta.get("model_fingerprint") != other.meta.get("model_fingerprint"):
            raise MoeSlimError("cannot add statistics gathered on different models")
        domains = {d: {k: v.clone() for k, v in t.items()} for d, t in self.domains.items()}
        for d, t in other.domains.items():
            if d not in domains:
                domains[d] = {k: v.clone() for k, v in t.items()}
                continue
            for f in ALL_FIELDS:
                domains[d][f] = torch.maximum(domains[d][f], t[f]) if f in MAX_FIELDS else domains[d][f] + t[f]
            for f in (*OPTIONAL_FIELDS, *RENORM_FIELDS):  # a sum only one run has does not describe the union
                if f in domains[d] and f in t:
                    domains[d][f] = domains[d][f] + t[f]
                else:
                    domains[d].pop(f, None)
        meta = dict(self.meta)
        meta["tokens_per_domain"] = {d: float(t[TOKEN_FIELD].max()) for d, t in domains.items()}
        meta["sources"] = list(self.meta.get("sources", [])) + list(other.meta.get("sources", []))
        samples = None
        if self.samples is not None and other.samples is not None:
            cap = max(int(self.meta.get("samples", {}).get("per_domain", 0)),
                      int(other.meta.get("samples", {}).get("per_domain", 0)))
            samples = self.samples.combine(other.samples, {d: t[TOKEN_FIELD] for d, t in self.domains.items()},
                                           {d: t[TOKEN_FIELD] for d, t in other.domains.items()}, cap)
            meta["samples"] = dict(self.meta.get("samples", {}), per_domain=cap)
        else:
            meta.pop("samples", None)  # a sample of one run does not represent the sum
        return RouterStats(domains, meta, samples)

    def _check_domains(self, names: Any) -> None:
        missing = [d for d in names if d not in self.domains]
        if missing:
            raise MoeSlimError(
                f"the statistics have no domain {', '.join(missing)} (they have: {', '.join(self.domains)})"
            )

    # -- model check -------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """A one-line error when these statistics were gathered on a different model."""
        from ..families import check_uniform, moe_layers
        from ..fingerprint import model_fingerprint

        layers = moe_layers(model)
        n = check_uniform(layers)
        if n != self.n_experts:
            raise MoeSlimError(
                f"stats were gathered on a model with {self.n_experts} experts per layer; this model has {n} "
                "(run observe on this model)"
            )
        if [l.name for l in layers] != list(self.meta["layers"]):
            raise MoeSlimError("stats were gathered on a model with other MoE layers (run observe on this model)")
        fp = model_fingerprint(model)
        if fp != self.meta.get("model_fingerprint"):
            raise MoeSlimError(
                f"stats were gathered on another model (fingerprint {self.meta.get('model_fingerprint', {}).get('config_hash')}"
                f", this model {fp['config_hash']}); run observe on this model"
            )

    # -- disk --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``stats.safetensors`` + ``meta.json`` into directory ``path``, atomically."""
        flat = {f"{d}/{f}": t.contiguous() for d, ts in self.domains.items() for f, t in ts.items()}
        with atomic_dir(path, overwrite=overwrite, kind="stats") as tmp:
            save_file(flat, str(tmp / "stats.safetensors"), metadata={"format": FORMAT})
            pause_point("after-first-file")
            meta = dict(self.meta, format=FORMAT, domains=list(self.domains))
            if self.samples is not None:
                self.samples.save(tmp / SAMPLES_FILE)
                meta["samples"] = dict(self.meta.get("samples", {}), format=SAMPLES_FORMAT, file=SAMPLES_FILE)
            else:
                meta.pop("samples", None)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RouterStats:
        """Read a stats directory; one-line errors for anything missing or corrupt."""
        p = Path(path)
        tensors_path, meta_path = p / "stats.safetensors", p / "meta.json"
        if not p.is_dir() or not tensors_path.exists() or not meta_path.exists():
            raise MoeSlimError(f"{p} is not a stats directory (expected stats.safetensors and meta.json; run observe)")
        try:
            meta = json.loads(meta_path.read_text())
            flat = load_file(str(tensors_path))
        except (json.JSONDecodeError, SafetensorError, OSError, UnicodeDecodeError) as exc:
            raise MoeSlimError(f"stats in {p} are corrupt ({type(exc).__name__}); run observe again") from exc
        if meta.get("format") != FORMAT:
            raise MoeSlimError(f"stats in {p} have format {meta.get('format')!r}, expected {FORMAT!r}")
        domains: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            d, _, f = key.rpartition("/")
            domains.setdefault(d, {})[f] = t
        for d in meta.get("domains", []):
            missing = [f for f in ALL_FIELDS if f not in domains.get(d, {})]
            if missing:
                raise MoeSlimError(f"stats in {p} are corrupt: domain {d} lacks {', '.join(missing)}")
        L, E = len(meta["layers"]), int(meta["num_experts"])
        for d, ts in domains.items():
            if tuple(ts["count"].shape) != (L, E):
                raise MoeSlimError(f"stats in {p} are corrupt: domain {d} has shape {tuple(ts['count'].shape)}")
        samples = None
        if meta.get("samples"):
            sp = p / meta["samples"].get("file", SAMPLES_FILE)
            try:
                samples = Samples.from_file(sp)
            except (SafetensorError, OSError) as exc:
                raise MoeSlimError(f"token samples in {sp} are missing or corrupt ({type(exc).__name__}); "
                                   "run observe with --samples again") from exc
        return cls(domains, meta, samples)


def _fmt(c: Any) -> str:
    t = torch.as_tensor(c)
    return f"{float(t):g}" if t.dim() == 0 else "per-layer"

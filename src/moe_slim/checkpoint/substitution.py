"""MoNE checkpoints in vLLM's expert-substitution format (vllm-project/vllm pull request #50415).

What is written, field by field (``config.json`` → ``compression_config.transform_config.expert_substitution``):

* ``version: 1``; ``router_semantics``: ``preserve_logical_expert_ids: true`` (the router and every
  config count keep all E experts), ``preserve_router_weights: true`` (a novice's route keeps its
  weight), ``renormalize_after_substitution: false``.
* ``targets``: one entry per MoE layer, keyed by the experts module's path (``model.layers.1.mlp.experts``):
  ``num_logical_experts`` (E), ``weight_layout: "compact_retained_experts"`` (only the kept experts'
  weights are stored; per-expert tensors keep their logical expert ids, fused tensors hold the kept
  rows in logical order), and ``replacements``: for each novice id ``{"format": "constant-v1",
  "tensors": {"value": NAME}}``, NAME being a ``[hidden]`` tensor in ``novices.safetensors``.

:func:`check_substitution` checks a block against those rules before anything is written: a layer
without novices gets no target (a target's ``replacements`` is never empty), and a plan with no novice
at all is refused (:func:`write_mone_checkpoint` raises), since the format would reject it.

Not written: the older ``approximate_experts`` config key of the MoNE authors' code (the pull request
rejects a config that has both). **Plain transformers cannot load this checkpoint** (the expert tensors
hold fewer experts than the config says, and nothing in transformers adds the constants); it is for a
serving engine that implements expert substitution. ``standard=True`` writes the nearest standard
checkpoint instead: the novices dropped, the router sliced, loadable everywhere (a MoNE-ranked prune).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MoeSlimError
from ..experts.mone import NovicePlan
from ..experts.prune import apply_plan, slice_layer
from ..families import moe_layers
from ..modeling.mtp import drop_mtp as drop_mtp_layers
from ..outputs import atomic_dir
from .save import cast_for_output, save_checkpoint, tidy_checkpoint_files

NOVICES_FILE = "novices.safetensors"
SUBSTITUTION_NOTE = ("This checkpoint uses vLLM's expert-substitution format (MoNE novices): plain transformers "
                     "cannot load it; serve it with an engine that implements expert substitution, or write the "
                     "nearest standard checkpoint with --standard.")


def substitution_config(paths: list[str], nplan: NovicePlan) -> dict[str, Any]:
    """``compression_config.transform_config.expert_substitution`` for the novices of ``nplan`` (layers
    without novices have no target)."""
    targets = {}
    for li, path in enumerate(paths):
        if not nplan.novices(li):
            continue
        targets[path] = {
            "num_logical_experts": nplan.plan.num_experts,
            "weight_layout": "compact_retained_experts",
            "replacements": {str(e): {"format": "constant-v1", "tensors": {"value": value_name(path, e)}}
                             for e in nplan.novices(li)},
        }
    return {"version": 1,
            "router_semantics": {"preserve_logical_expert_ids": True, "preserve_router_weights": True,
                                 "renormalize_after_substitution": False},
            "targets": targets}


def check_substitution(block: dict[str, Any]) -> None:
    """Raise :class:`MoeSlimError` unless ``block`` follows the expert-substitution rules above."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise MoeSlimError(f"invalid expert-substitution block: {what}")

    need(block.get("version") == 1, "version must be 1")
    sem = block.get("router_semantics") or {}
    need(all(isinstance(sem.get(k), bool) for k in _SEMANTICS), f"router_semantics needs booleans {', '.join(_SEMANTICS)}")
    targets = block.get("targets")
    need(isinstance(targets, dict) and len(targets) > 0, "targets must name at least one experts module")
    for path, t in targets.items():
        E = t.get("num_logical_experts")
        need(isinstance(E, int) and E >= 1, f"{path}: num_logical_experts must be a positive integer")
        need(t.get("weight_layout") == "compact_retained_experts", f"{path}: unknown weight_layout")
        reps = t.get("replacements")
        need(isinstance(reps, dict) and len(reps) > 0, f"{path}: replacements must not be empty")
        for e, r in reps.items():
            need(e.isdigit() and int(e) < E, f"{path}: replacement id {e!r} is not a logical expert id below {E}")
            need(r.get("format") == "constant-v1" and isinstance((r.get("tensors") or {}).get("value"), str),
                 f"{path}.{e}: a replacement is {{format: constant-v1, tensors: {{value: NAME}}}}")


_SEMANTICS = ("preserve_logical_expert_ids", "preserve_router_weights", "renormalize_after_substitution")


def value_name(path: str, e: int) -> str:
    return f"{path}.novice_values.{e}"


@torch.no_grad()
def _drop_novice_weights(layer: Any, keep: list[int]) -> None:
    """Keep only the kept experts' weights (router and config counts untouched)."""
    if layer.family.layout == "fused":
        slice_layer(layer, keep, experts_only=True)
    else:
        for e in set(range(layer.num_experts)) - set(keep):  # by name: the ModuleDict may hold other modules
            del layer.experts[f"expert_{e}"]


def _logical_ids(directory: Path, renames: dict[str, list[int]]) -> None:
    """Per-expert tensors of fused layers come out numbered 0..k-1: give them back their logical ids."""
    pats = {path: re.compile(rf"^{re.escape(path)}\.(expert_)?(\d+)\.") for path in renames}

    def rename(key: str) -> str:
        for path, pat in pats.items():
            m = pat.match(key)
            if m:
                return f"{path}.{m.group(1) or ''}{renames[path][int(m.group(2))]}." + key[m.end():]
        return key

    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(f))
        new = {rename(k): v for k, v in tensors.items()}
        if list(new) != list(tensors):
            save_file(new, str(f), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        d = json.loads(index.read_text())
        d["weight_map"] = {rename(k): v for k, v in d.get("weight_map", {}).items()}
        index.write_text(json.dumps(d, indent=2))


def write_mone_checkpoint(model: nn.Module, tokenizer: Any, out: str | os.PathLike, nplan: NovicePlan, *, card: str,
                          standard: bool = False, dtype: torch.dtype | None = None, overwrite: bool = False,
                          drop_mtp: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (the original, changed in place) with ``nplan``'s novices as a checkpoint (see the module);
    ``drop_mtp`` leaves its MTP layers (the plan's last layers) out and sets the config's MTP count to 0; without
    ``dtype``, every tensor is written in its dtype in the ``source`` checkpoint and each novice in its experts'."""
    if standard:
        apply_plan(model, nplan.plan)
        if drop_mtp:
            drop_mtp_layers(model)
        return save_checkpoint(model, tokenizer, out, card=card, plan=nplan.plan, dtype=dtype, source=source,
                               overwrite=overwrite)
    if drop_mtp:
        drop_mtp_layers(model)  # the MTP layers come last: the plan's layers still line up with the model's
    layers = moe_layers(model)
    names = {id(mod): n for n, mod in model.named_modules()}
    paths = [names[id(l.experts)] for l in layers]
    if not any(nplan.novices(li) for li in range(len(layers))):
        raise MoeSlimError("this MoNE plan has no novice in any layer (the ratio rounds to zero experts), and an "
                           "expert-substitution block needs at least one; use a larger --ratio")
    block = substitution_config(paths, nplan)
    check_substitution(block)
    cast_for_output(model, dtype, source)
    vdtype = [next(layer.experts.parameters()).dtype for layer in layers]  # a novice is written as its experts are
    renames = {}
    for li, layer in enumerate(layers):
        keep = sorted(nplan.plan.layers[li].keep)
        _drop_novice_weights(layer, keep)
        if layer.family.layout == "fused":  # fixed experts' rows (LongCat's zero experts) follow, as in the source
            renames[paths[li]] = keep + list(range(layer.num_experts, layer.num_experts + layer.num_fixed))
    model.config.compression_config = {"transform_config": {"expert_substitution": block}}
    values = {value_name(p, e): nplan.values[li][e].to(vdtype[li]).contiguous()
              for li, p in enumerate(paths) for e in nplan.novices(li)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        _logical_ids(tmp, renames)
        save_file(values, str(tmp / NOVICES_FILE), metadata={"format": "pt"})
        index = tmp / "model.safetensors.index.json"
        if index.is_file():
            d = json.loads(index.read_text())
            d["weight_map"].update({k: NOVICES_FILE for k in values})
            index.write_text(json.dumps(d, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        nplan.plan.save(tmp / "plan.json")
        tidy_checkpoint_files(tmp)
        (tmp / "README.md").write_text(card)
    return Path(out)

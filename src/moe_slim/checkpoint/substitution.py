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

from ..experts.mone import NovicePlan
from ..experts.prune import apply_plan
from ..families import moe_layers
from ..modeling.mtp import drop_mtp as drop_mtp_layers
from ..outputs import atomic_dir
from .save import save_checkpoint, tidy_checkpoint_files

NOVICES_FILE = "novices.safetensors"
SUBSTITUTION_NOTE = ("This checkpoint uses vLLM's expert-substitution format (MoNE novices): plain transformers "
                     "cannot load it; serve it with an engine that implements expert substitution, or write the "
                     "nearest standard checkpoint with --standard.")


def substitution_config(paths: list[str], nplan: NovicePlan) -> dict[str, Any]:
    """``compression_config.transform_config.expert_substitution`` for the novices of ``nplan``."""
    targets = {}
    for li, path in enumerate(paths):
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


def value_name(path: str, e: int) -> str:
    return f"{path}.novice_values.{e}"


@torch.no_grad()
def _drop_novice_weights(layer: Any, keep: list[int]) -> None:
    """Keep only the kept experts' weights (router and config counts untouched)."""
    if layer.family.layout == "fused":
        idx = torch.tensor(keep, dtype=torch.long)
        for name, p in layer.expert_params().items():
            setattr(layer.experts, name, nn.Parameter(p.data[idx.to(p.device)].clone(), requires_grad=False))
    else:
        for k in [k for k in layer.experts.keys() if int(k.rsplit("_", 1)[1]) not in keep]:
            del layer.experts[k]


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
                          drop_mtp: bool = False) -> Path:
    """Write ``model`` (the original, changed in place) with ``nplan``'s novices as a checkpoint (see the module);
    ``drop_mtp`` leaves its MTP layers (the plan's last layers) out and sets the config's MTP count to 0."""
    if standard:
        apply_plan(model, nplan.plan)
        if drop_mtp:
            drop_mtp_layers(model)
        return save_checkpoint(model, tokenizer, out, card=card, plan=nplan.plan, dtype=dtype, overwrite=overwrite)
    if drop_mtp:
        drop_mtp_layers(model)  # the MTP layers come last: the plan's layers still line up with the model's
    layers = moe_layers(model)
    names = {id(mod): n for n, mod in model.named_modules()}
    paths = [names[id(l.experts)] for l in layers]
    if dtype is not None:
        model.to(dtype)
    vdtype = dtype or next(model.parameters()).dtype
    renames = {}
    for li, layer in enumerate(layers):
        keep = sorted(nplan.plan.layers[li].keep)
        _drop_novice_weights(layer, keep)
        if layer.family.layout == "fused":
            renames[paths[li]] = keep
    model.config.compression_config = {"transform_config": {"expert_substitution": substitution_config(paths, nplan)}}
    values = {value_name(p, e): nplan.values[li][e].to(vdtype).contiguous()
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

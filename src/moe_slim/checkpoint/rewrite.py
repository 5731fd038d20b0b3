"""Apply an expert plan to checkpoint files: stream the shards tensor by tensor, never build the model.

Pruning is slicing. Every tensor of the source is either copied as it is, dropped (a per-expert
tensor of a removed expert), renamed (a kept per-expert tensor gets its new number), or sliced
along its first dimension (fused ``[E, ...]`` expert tensors, router rows, router biases, DeepSeek's
correction bias). Slicing the first dimension of a stored tensor is copying byte ranges, so the
output keeps every tensor's dtype exactly, and quantized experts (GPT-OSS MXFP4 blocks and scales,
FP8 weights with their block scales) are sliced without dequantizing. Which tensor is what comes
from :class:`moe_slim.modeling.ondisk.DiskLayout` (transformers' conversion tables on a meta-device
skeleton). Resident memory is one read chunk plus the interpreter: not a tensor, not a shard.

The output directory appears whole or not at all (:func:`moe_slim.outputs.atomic_dir`): new shards
and index, the config with the new expert count (top-k never above it), tokenizer and other small
files copied, ``plan.json`` and a model card.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeSlimError
from ..experts.merge.at_size import MergedLayers, check_layers_merged_once
from ..experts.merge.plan import MergePlan
from ..experts.plan import ExpertPlan
from ..experts.prune import count_parameters
from ..families import (
    SLICEABLE_QUANTIZATION,
    expert_axis,
    family_of,
    group_size_ok,
    kept_rows,
    set_config_counts,
)
from ..modeling.loading import load_config
from ..modeling.mtp import attach_mtp, check_mtp_writable, checkpoint_skeleton, mtp_of, set_mtp_count
from ..modeling.ondisk import DiskLayout, DiskTensor, meta_model, quant_method
from ..modeling.shards import (
    FLOATING,
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    ShardedCheckpoint,
)
from ..outputs import atomic_dir
from .save import tidy_checkpoint_files
from .shard_writer import DEFAULT_MAX_SHARD_BYTES, OutTensor, write_shards

#: files of a checkpoint directory that are weights (never copied: the rewrite writes its own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
#: files a rewrite writes itself, so a source's copies (e.g. of an earlier moe_slim output) are not carried over
OWN_FILES = {"config.json", "README.md", "plan.json", "model.safetensors.index.json"}
#: files that describe how the source was trained or scored: the derived model is another model
SOURCE_ONLY_FILES = {"metrics.json", "training.json", "results.json", "sft.json", "all_results.json",
                     "eval_results.json", "train_results.json", "trainer_state.json", "recipe.yaml"}


def check_quantization(config: Any, where: str) -> str | None:
    """The checkpoint's quantization method, or a one-line error when a rewrite cannot slice it."""
    method = quant_method(config)
    if method is not None and method not in SLICEABLE_QUANTIZATION:
        raise MoeSlimError(f"{where} is quantized with '{method}', which moe_slim cannot slice without dequantizing "
                           f"(known: {', '.join(SLICEABLE_QUANTIZATION)}); dequantize it first")
    return method


def refuse_quantized_merge(config: Any, where: Any) -> None:
    """Merging averages expert weights, which a quantized checkpoint does not hold as numbers: every merge
    path (at size, in memory, apply of a merge plan) refuses it with this one line, naming the way out."""
    method = quant_method(config)
    if method is None:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    cls = AUTO_QUANTIZATION_CONFIG_MAPPING.get(method)
    how = (f"AutoModelForCausalLM.from_pretrained(SRC, quantization_config={cls.__name__}(dequantize=True))"
           ".save_pretrained(DIR)" if cls is not None else "dequantize it")
    raise MoeSlimError(f"{where} is quantized ({method}); merging averages expert weights, so it needs a dequantized "
                       f"checkpoint: write one ({how}) and merge that (pruning slices these experts as they are)")


def _convert(source: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        t = source().to(dtype).contiguous()
        yield t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return chunks


def _out(ckpt: ShardedCheckpoint, d: DiskTensor, name: str, rows: list[int] | None,
         dtype: torch.dtype | None) -> OutTensor:
    e = ckpt.entry(d.key)
    shape = e.shape if rows is None else (len(rows), *e.shape[1:])
    if dtype is not None and e.dtype in FLOATING and TORCH_DTYPES[e.dtype] != dtype:
        return OutTensor(name, SAFETENSORS_DTYPES[dtype], shape, _convert(lambda: ckpt.tensor(d.key, rows), dtype))
    return OutTensor(name, e.dtype, shape, lambda: ckpt.iter_bytes(d.key, rows))


def _columns(ckpt: ShardedCheckpoint, d: DiskTensor, cols: list[int], dtype: torch.dtype | None) -> OutTensor:
    e = ckpt.entry(d.key)
    to = dtype if dtype is not None and e.dtype in FLOATING else TORCH_DTYPES[e.dtype]
    return OutTensor(d.key, SAFETENSORS_DTYPES[to], (e.shape[0], len(cols)),
                     _convert(lambda: ckpt.tensor(d.key)[:, cols], to))


def check_expert_layout(ckpt: ShardedCheckpoint, layout: DiskLayout, n_experts: int) -> None:
    """One-line errors when a MoE layer's experts on disk are not what the plan expects."""
    for layer in layout.layers:
        tensors = layout.of_layer(layer.index)
        experts = [d for d in tensors if d.role == "expert"]
        if not experts:
            raise MoeSlimError(f"no expert tensors of {layer.name} were found in {ckpt.path} (unknown on-disk layout)")
        per: dict[str, set[int]] = {}
        for d in experts:
            if d.expert is None:
                shape = ckpt.entry(d.key).shape
                if not shape or shape[0] != n_experts:
                    raise MoeSlimError(f"tensor {d.key} has shape {list(shape)}; expected the {n_experts} experts "
                                       "along its first dimension")
            else:
                per.setdefault(d.renumbered(0), set()).add(d.expert)
        for name, seen in per.items():
            if seen != set(range(n_experts)):
                missing = sorted(set(range(n_experts)) - seen)[:3]
                raise MoeSlimError(f"{ckpt.path} lacks per-expert tensors of {layer.name} for experts {missing} "
                                   f"(like {name.replace('.0.', f'.{missing[0]}.', 1) if missing else name})")


def pruned_tensors(ckpt: ShardedCheckpoint, layout: DiskLayout, plan: ExpertPlan,
                   dtype: torch.dtype | None = None, merged: MergedLayers | None = None,
                   skip: frozenset[str] = frozenset()) -> list[OutTensor]:
    """The output tensors of ``plan`` applied to the checkpoint, in source order (nothing read yet).

    With ``merged`` (a merge plan), each MoE layer's expert and router tensors come from merging that
    layer; names and shapes are those of keeping the groups' representatives."""
    E = plan.num_experts
    keep = {i: lp.keep for i, lp in enumerate(plan.layers)}
    out: list[OutTensor] = []

    layer_of: list[int | None] = []

    def add(d: DiskTensor, name: str, rows: list[int] | None) -> None:
        t = _out(ckpt, d, name, rows, dtype)
        if merged is not None and d.layer is not None and d.role != "other":
            t = OutTensor(name, t.dtype, t.shape,
                          _convert(lambda li=d.layer: merged.tensor(li, name), TORCH_DTYPES[t.dtype]))
        out.append(t)
        layer_of.append(d.layer if d.role != "other" else None)

    for key in ckpt.keys:
        if key in skip:
            continue
        d = layout.tensors[key]
        if d.role == "other" or d.layer is None:
            add(d, key, None)
            continue
        kept = keep[d.layer]
        if d.role == "expert" and d.expert is not None:
            if d.expert in kept:
                add(d, d.renumbered(kept.index(d.expert)), None)
            continue
        shape = tuple(ckpt.entry(key).shape)
        if expert_axis(shape, E) == 1 and E > 1:  # a [1, E] row (ERNIE-4.5's moe_statics): small, sliced in memory
            out.append(_columns(ckpt, d, list(kept), dtype))
            layer_of.append(d.layer)
            continue
        rows = shape[0] if shape else 0
        add(d, key, kept_rows(kept, rows, E) if rows in (E, E + layout.family.router_extra_rows) else None)
    if merged is not None:  # a merged layer's tensors together (where its first one stood): each layer merged once
        first = {li: i for i, li in reversed(list(enumerate(layer_of))) if li is not None}
        order = sorted(range(len(out)), key=lambda i: (first[layer_of[i]] if layer_of[i] is not None else i, i))
        out = [out[i] for i in order]
    return out


def updated_config(config: Any, family: Any, n_keep: int, info: dict[str, Any], dtype: torch.dtype | None) -> Any:
    """The output's config: the new expert count (through the config object, so aliases such as
    ``num_local_experts`` follow), a top-k that fits, the dtype when converted, what moe_slim did."""
    config = copy.deepcopy(config)
    set_config_counts(config, family, n_keep)
    if dtype is not None:
        config.dtype = dtype
    config.moe_slim = info
    return config


def copy_small_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config and other non-weight files of the source directory (top level only)."""
    copied = []
    for f in sorted(src.iterdir()):
        skip = f.name in OWN_FILES | SOURCE_ONLY_FILES or f.name.startswith(".") or f.suffix in WEIGHT_SUFFIXES
        if not f.is_file() or skip:
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


def rewrite_pruned(
    source: str | os.PathLike,
    out: str | os.PathLike,
    plan: ExpertPlan,
    *,
    card: Callable[[torch.nn.Module, int, int], str],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    drop_mtp: bool = False,
) -> dict[str, Any]:
    """Write ``plan`` applied to the checkpoint at ``source`` into ``out`` by streaming; return sizes.

    ``card(output_skeleton, params_before, params_after)`` returns the model card's text. ``dtype``
    converts floating tensors (default: every tensor keeps its source dtype). MTP layers on disk are MoE
    layers of the plan like the others; ``drop_mtp`` leaves them out and sets the config's MTP count to 0.
    """
    from tqdm.auto import tqdm

    src = Path(source)
    config = load_config(src)
    family = family_of(config)
    check_quantization(config, str(src))
    if plan.kind not in ("prune", "merge"):
        raise MoeSlimError(f"this is a {plan.kind} plan; a streaming rewrite applies prune and merge plans")
    if plan.kind == "merge":
        refuse_quantized_merge(config, src)
    plan.check_writable()
    ckpt = ShardedCheckpoint(src)
    model = checkpoint_skeleton(config, src)
    layout = DiskLayout(model, ckpt.keys)
    counts = {layer.num_experts for layer in layout.layers}
    if counts != {plan.num_experts}:
        raise MoeSlimError(f"plan was made for {plan.num_experts} experts per layer; {src} has {sorted(counts)} "
                           "(make the plan on this model)")
    plan.validate(family, config, [layer.name for layer in layout.layers])
    n_keep = plan.kept_counts[0]
    why = group_size_ok(family, config, n_keep)
    if why:
        raise MoeSlimError(f"cannot keep {n_keep} experts per layer: {why}")
    check_expert_layout(ckpt, layout, plan.num_experts)
    mtp = mtp_of(model)
    check_mtp_writable(model, src, drop_mtp)
    skip = frozenset(mtp.keys) if drop_mtp and mtp is not None else frozenset()
    merged = MergedLayers(src, config, plan, dtype) if isinstance(plan, MergePlan) else None
    tensors = pruned_tensors(ckpt, layout, plan, dtype, merged, skip)

    info = {"plan": plan.kind, "kept_per_layer": plan.kept_counts, "streamed": True}
    if plan.kind == "merge":
        info["method"] = plan.info.get("method")
    if drop_mtp:
        info["dropped_mtp"] = mtp.layer_names() if mtp is not None else []
    new_config = updated_config(config, family, n_keep, info, dtype)
    if drop_mtp:
        set_mtp_count(new_config, 0)
    out_model = meta_model(new_config)
    attach_mtp(out_model, {t.name: t.shape for t in tensors})  # the output's MTP layers count in its size
    before, after = count_parameters(model), count_parameters(out_model)
    total = sum(t.nbytes for t in tensors)
    with atomic_dir(out, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="rewrite", disable=not progress) as bar:
        write_shards(tmp, tensors, max_shard_bytes=max_shard_bytes, on_bytes=bar.update)
        if merged is not None:
            check_layers_merged_once(merged, [l.index for l in layout.layers if all(d.key not in skip for d in
                                                                                   layout.of_layer(l.index))])
        new_config.save_pretrained(str(tmp))
        copy_small_files(src, tmp)
        tidy_checkpoint_files(tmp)
        plan.info.update(params_before=before, params_after=after)
        plan.write_files(tmp)
        (tmp / "README.md").write_text(card(out_model, before, after))
    return {"params_before": before, "params_after": after, "bytes_in": ckpt.total_bytes, "bytes_out": total}

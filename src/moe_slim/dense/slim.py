"""Removing whole layers from a model: in memory, then as a checkpoint that reloads by itself.

:func:`slim_model` keeps the chosen layers of each stack, moves what only the first layer owned
(T5's relative attention bias) to the new first layer, renumbers ``layer_idx`` on every module of
the kept layers (the KV cache is indexed by it), and rewrites the config: the layer counts and
every per-layer config entry named in the family table. :func:`save_slimmed` writes the result
atomically; :func:`apply_plan` does both from a ``plan.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeSlimError
from ..fingerprint import config_hash, model_fingerprint
from ..modeling.loading import load_config, load_model, load_tokenizer
from ..outputs import atomic_dir, check_output
from .family import (
    Family,
    Stack,
    family_for,
    get_path,
    layer_list,
    parent_and_name,
    present_stacks,
)

PLAN_FORMAT = "moe_slim/dense-plan@1"


# --------------------------------------------------------------------------------------------
# loading


def _gguf_location(path: Path) -> tuple[Path, str] | None:
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if len(ggufs) > 1:
            raise MoeSlimError(f"{path} holds several GGUF files ({', '.join(ggufs)}); give the file itself")
    return None


def load_dense(path: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """Load a checkpoint directory or a GGUF file for probing/slimming, with its tokenizer.

    Decoder and seq2seq checkpoints go through :func:`moe_slim.modeling.loading.load_model`; encoders
    (BERT...) load as the class their config names, so a slimmed copy keeps its heads. GGUF files
    are de-quantized by transformers; the quantizer is dropped so the model saves as safetensors.
    """
    import transformers

    p = Path(path)
    if not p.exists():
        raise MoeSlimError(f"model {p} does not exist (give a checkpoint directory or a .gguf file)")
    gg = _gguf_location(p)
    if gg is not None:
        folder, name = gg
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=name)
            auto = transformers.AutoModelForCausalLM
            model = auto.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        except Exception as exc:
            raise MoeSlimError(f"could not load GGUF model {p}: {str(exc).splitlines()[0]} "
                               "(install the gguf package: pip install gguf)") from exc
        del config
        _drop_quantizer(model)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        model.eval()
        return model, tok
    config = load_config(p)
    arch = (getattr(config, "architectures", None) or [None])[0]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    generative = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
    if arch in generative or (arch is None and getattr(config, "is_decoder", False)):
        return load_model(p)
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    from ..modeling.loading import require_safetensors

    require_safetensors(p)  # never unpickle: only safetensors weights are read
    try:
        model = cls.from_pretrained(str(p), dtype="auto", use_safetensors=True)
    except Exception as exc:
        raise MoeSlimError(f"could not load model {p}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, load_tokenizer(p)


def gguf_source(path: str | os.PathLike) -> str | None:
    """``GGUF <quantization>`` (e.g. ``GGUF MOSTLY_Q4_1``) when ``path`` is a GGUF model, else None."""
    gg = _gguf_location(Path(path))
    if gg is None:
        return None
    try:
        import gguf

        field = gguf.GGUFReader(str(gg[0] / gg[1])).fields.get("general.file_type")
        kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name if field is not None else "unknown type"
    except Exception:  # noqa: BLE001 - the type is only reported; loading will name any real problem
        kind = "unknown type"
    return f"GGUF {kind}"


WRITE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def output_dtype(spec: str, model: torch.nn.Module, gguf: str | None) -> torch.dtype:
    """The dtype to write: ``auto`` keeps the loaded dtype, except that a GGUF source (de-quantized to
    float32 on load) is written as bfloat16 (float32 would be 3x the GGUF file for no precision it had)."""
    if spec not in WRITE_DTYPES:
        raise MoeSlimError(f"--dtype {spec!r}: choose one of auto, bfloat16, float16, float32")
    want = WRITE_DTYPES[spec]
    if want is not None:
        return want
    return torch.bfloat16 if gguf else next(model.parameters()).dtype


def dequantized_note(gguf: str, dtype: torch.dtype) -> str:
    """One sentence for the card and stdout."""
    return f"the source is {gguf}, de-quantized on load; written as {str(dtype).removeprefix('torch.')}"


def _drop_quantizer(model: torch.nn.Module) -> None:
    """Forget GGUF/other load-time quantizers on a model whose weights are plain tensors."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in {id(model.config): model.config}.values():
        if hasattr(cfg, "quantization_config"):
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


# --------------------------------------------------------------------------------------------
# slimming in memory


def _check_keep(keep: dict[str, list[int]], sizes: dict[str, int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in keep.items():
        if name not in sizes:
            raise MoeSlimError(f"the plan names a layer stack {name!r}; this model has {', '.join(sizes)}")
        if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise MoeSlimError(f"kept layers of stack {name!r} must be a list of integers")
        clean = sorted(set(idx))
        if not clean:
            raise MoeSlimError(f"the plan keeps no layer of stack {name!r}; keep at least one")
        bad = [i for i in clean if not 0 <= i < sizes[name]]
        if bad:
            raise MoeSlimError(f"the plan keeps layer {bad[0]} of stack {name!r}, which has only {sizes[name]} layers")
        out[name] = clean
    for name, n in sizes.items():
        out.setdefault(name, list(range(n)))
    return out


def remap_config(config: Any, family: Family, stack: Stack, keep: list[int], old_n: int) -> None:
    """Rewrite one stack's layer count and per-layer config entries for the kept layers."""
    setattr(config, stack.count_key, len(keep))
    if len(family.stacks) > 1:
        return  # per-layer config rules are defined for single-stack families only
    if family.sparse_step is not None:
        ss = family.sparse_step
        step = getattr(config, ss.step_key, 1) or 1
        dense = set(getattr(config, ss.indices_key, None) or [])
        n_exp = getattr(config, ss.experts_key, 0) or 0
        if n_exp > 0:
            sparse = [(i not in dense) and (i + 1) % step == 0 for i in range(old_n)]
            setattr(config, ss.step_key, 1)
            setattr(config, ss.indices_key, [j for j, i in enumerate(keep) if not sparse[i]])
    for key in family.per_layer_lists:
        val = getattr(config, key, None)
        if val is None:
            continue
        if not isinstance(val, (list, tuple)) or len(val) != old_n:
            raise MoeSlimError(f"config.{key} has {len(val) if isinstance(val, (list, tuple)) else 'no'} "
                               f"entries for {old_n} layers; cannot re-map it (fix the config)")
        setattr(config, key, [val[i] for i in keep])
    for key in family.index_lists:
        if family.sparse_step is not None and key == family.sparse_step.indices_key:
            continue
        val = getattr(config, key, None)
        if val:
            pos = {i: j for j, i in enumerate(keep)}
            setattr(config, key, [pos[i] for i in val if i in pos])
    for key in family.prefix_counts:
        val = getattr(config, key, None)
        if isinstance(val, int):
            setattr(config, key, sum(1 for i in keep if i < val))


def slim_model(model: torch.nn.Module, keep: dict[str, list[int]]) -> torch.nn.Module:
    """Keep only the given layers of each stack (missing stacks keep all), in place; returns the model."""
    family = family_for(model)
    stacks = present_stacks(model)
    sizes = {s.name: len(layer_list(model, s)) for s in stacks}
    keep = _check_keep(keep, sizes)
    base = model.base_model
    for stack in stacks:
        old = list(layer_list(model, stack))
        idx = keep[stack.name]
        new = [old[i] for i in idx]
        if idx[0] != 0:
            for mod_path, attr, flag in stack.first_layer_owns:
                src = get_path(old[0], mod_path)
                dst = get_path(new[0], mod_path)
                if getattr(src, attr, None) is not None and getattr(dst, attr, None) is None:
                    setattr(dst, attr, getattr(src, attr))
                    setattr(dst, flag, True)
        for j, layer in enumerate(new):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        parent, name = parent_and_name(base, stack.path)
        setattr(parent, name, torch.nn.ModuleList(new))
        remap_config(model.config, family, stack, idx, len(old))
        if stack.module_count_key is not None:
            owner = get_path(base, stack.path.rpartition(".")[0])
            own_cfg = getattr(owner, "config", None)
            if own_cfg is not None and own_cfg is not model.config:
                setattr(own_cfg, stack.module_count_key, len(idx))
    return model


def slim_copy(model: torch.nn.Module, keep: dict[str, list[int]]) -> torch.nn.Module:
    """A slimmed copy of the model that shares the weight tensors (no weight is copied): for measuring,
    or as the source of a new model that copies what it trains."""
    import copy

    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return slim_model(copy.deepcopy(model, memo), keep)


# --------------------------------------------------------------------------------------------
# plans and checkpoints


def make_plan(model: torch.nn.Module, keep: dict[str, list[int]], *, method: str, source: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A plan dict (the JSON that ``slim-dense`` applies)."""
    sizes = {s.name: len(layer_list(model, s)) for s in present_stacks(model)}
    keep = _check_keep(keep, sizes)
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "method": method,
        "model": {
            "source": source,
            "model_type": model.config.model_type,
            "family": family_for(model).name,
            "config_hash": config_hash(model.config),
            "layers": sizes,
        },
        "keep": keep,
        "drop": {k: [i for i in range(sizes[k]) if i not in set(v)] for k, v in keep.items()},
    }
    plan.update(extra)
    return plan


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MoeSlimError(f"plan {p} does not exist (write one with: moe-slim probe MODEL --tasks ... --out DIR)")
    try:
        plan = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeSlimError(f"plan {p} is not valid JSON: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("keep"), dict):
        raise MoeSlimError(f"{p} is not a dense layer plan (expected format {PLAN_FORMAT!r} with a 'keep' table)")
    return plan


def check_plan_matches(plan: dict[str, Any], model: torch.nn.Module) -> None:
    want = plan.get("model", {})
    sizes = {s.name: len(layer_list(model, s)) for s in present_stacks(model)}
    if want.get("model_type") not in (None, model.config.model_type):
        raise MoeSlimError(f"the plan was made for a {want['model_type']} model; this one is "
                           f"{model.config.model_type} (run probe on this model)")
    if want.get("layers") not in (None, sizes):
        raise MoeSlimError(f"the plan was made for a model with layers {want['layers']}; this one has {sizes} "
                           "(run probe on this model)")
    if want.get("config_hash") not in (None, config_hash(model.config)):
        raise MoeSlimError("the plan was made for a model with a different config (hash "
                           f"{want['config_hash']} vs {config_hash(model.config)}); run probe on this model")


def save_slimmed(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, *, overwrite: bool = False,
                 provenance: dict[str, Any] | None = None, card: str | None = None) -> Path:
    """Write a slimmed model (and tokenizer) as safetensors, atomically."""
    _drop_quantizer(model)
    if provenance is not None:
        model.config.moe_slim = {"dense_slim": provenance}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if provenance is not None:
            (tmp / "slim.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
    return Path(out)


def apply_plan(model_path: str | os.PathLike, plan_path: str | os.PathLike, out: str | os.PathLike, *,
               overwrite: bool = False, heal_steps: int = 0, heal_mode: str = "distill", heal_data: str | None = None,
               data_dir: str | os.PathLike | None = None, heal_lr: float = 1e-4, seed: int = 0,
               log: Any = None, dtype: str = "auto") -> dict[str, Any]:
    """Load MODEL, remove the layers the plan drops, optionally heal (``heal_steps`` of distillation from
    the original, or SFT), write the checkpoint and its model card to OUT. Returns a summary.

    ``dtype``: what to write (:func:`output_dtype`: ``auto`` keeps the source dtype, bfloat16 for GGUF)."""
    import copy

    from ..checkpoint.cards import dense_card

    check_output(out, overwrite, inputs=[model_path, plan_path], kind="checkpoint")
    plan = read_plan(plan_path)
    if heal_steps < 0:
        raise MoeSlimError(f"--heal {heal_steps}: give a number of steps >= 0")
    gguf = gguf_source(model_path)
    model, tok = load_dense(model_path)
    write_dtype = output_dtype(dtype, model, gguf)
    check_plan_matches(plan, model)
    before = model_fingerprint(model)
    n_before = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model) if heal_steps else None
    slim_model(model, plan["keep"])
    n_after = sum(p.numel() for p in model.parameters())
    heal_info = None
    if heal_steps:
        from .heal import DEFAULT_HEAL_DATA, heal

        heal_info = heal(model, tok, heal_steps, teacher=teacher, mode=heal_mode, data=heal_data or DEFAULT_HEAL_DATA,
                         data_dir=data_dir, lr=heal_lr, seed=seed, log=log)
        del teacher
    provenance = {
        "source": str(model_path),
        "source_fingerprint": before,
        "plan": str(plan_path),
        "method": plan.get("method"),
        "keep": {k: list(v) for k, v in plan["keep"].items()},
        "layers_before": plan.get("model", {}).get("layers"),
        "params_before": n_before,
        "params_after": n_after,
        "budget": plan.get("budget"),
        "measured": plan.get("measured"),
        "heal": heal_info,
        "dtype": str(write_dtype).removeprefix("torch."),
        "dequantized": dequantized_note(gguf, write_dtype) if gguf else None,
    }
    model.to(write_dtype)
    causal = family_for(model).kind == "decoder" and model.get_output_embeddings() is not None
    card = dense_card(source=str(model_path), provenance=provenance, model=model, causal=causal)
    if gguf:
        card = card.rstrip("\n") + f"\n\n## Source format\n\nNote: {provenance['dequantized']}.\n"
    save_slimmed(model, tok, out, overwrite=overwrite, provenance=provenance, card=card)
    return provenance

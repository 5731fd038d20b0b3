"""What SFT trains: every parameter (``full``), the experts and routers found through the family
table (``experts``), the routers alone (``router``: their weights and biases, the cheapest healing
on a big model), or LoRA adapters (``lora``, peft; fused 3-D experts via ``target_parameters``).

A DeepSeek-V3 correction bias is a buffer that only changes which experts are selected, so no
gradient reaches it: ``router`` trains the router weight (and a bias where the family has one).
"""

from __future__ import annotations

from torch import nn

from ..errors import MoeSlimError

MODES: tuple[str, ...] = ("full", "experts", "router", "lora")
MODE_ALIASES = {"experts-router": "experts", "experts_and_router": "experts", "experts-and-router": "experts"}
DEFAULT_LR = {"full": 5e-5, "experts": 1e-4, "router": 1e-3, "lora": 2e-4}


# --------------------------------------------------------------------------------------- modes


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA adapts: all but the output head and the routers."""
    from ..families import family_of, moe_layers

    skip: list[str] = []
    try:
        family_of(model)
        for layer in moe_layers(model):
            skip.append(f"{layer.name}.{layer.family.router_attr}")
    except MoeSlimError:
        pass  # a dense model: adapt every linear but the head
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is out_emb:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        names.append(name)
    if not names:
        raise MoeSlimError("this model has no nn.Linear layer for LoRA to adapt (use --mode experts or full)")
    return names


def lora_expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the fused 3-D expert weights (``gate_up_proj``, ``down_proj``, ...), for peft's
    ``target_parameters`` (one low-rank update per expert). Empty for module-layout experts, which
    :func:`lora_target_modules` already covers as linears."""
    from ..families import moe_layers

    names = []
    for layer in moe_layers(model):
        if layer.family.layout != "fused":
            continue
        if layer.family.flat_experts:
            raise MoeSlimError(f"LoRA on {layer.family.name}'s flat expert matrices is not supported (peft wraps the "
                               "module holding them, and the experts' forward reads them as its attributes); use "
                               "--mode experts, or LoRA without --lora-experts")
        for pname, p in layer.expert_params().items():
            if p.dim() == 3:
                names.append(f"{layer.name}.{layer.family.experts_attr}.{pname}")
    return names


def set_trainable(model: nn.Module, mode: str) -> int:
    """Freeze/unfreeze parameters for ``full``, ``experts`` or ``router`` mode; returns the trainable count."""
    from ..families import moe_layers

    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode in ("experts", "router"):
        layers = moe_layers(model)  # one-line error for a model that is not a supported MoE
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            modules = [layer.router] if mode == "router" else [layer.experts, layer.router] + [
                getattr(layer.block, a) for a in layer.family.shared_attrs if getattr(layer.block, a, None) is not None]
            for m in modules:
                for p in m.parameters():
                    if p.is_floating_point():
                        p.requires_grad_(True)
    else:
        raise ValueError(mode)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_mode(mode: str) -> str:
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise MoeSlimError(f"unknown SFT mode {mode!r} (choose from: {', '.join(MODES)})")
    return mode

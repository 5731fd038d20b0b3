"""Tiny checkpoints with MTP (next-n) layers on disk, and transformers' own MTP forward as the oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe_slim.modeling.tiny import save_tiny, tiny_config


def _extras(sd: dict[str, torch.Tensor], p: str, H: int, g: torch.Generator, names: tuple[str, ...],
            proj: str) -> None:
    """An MTP depth's norms (near 1 or near 0, as the family's RMSNorm centres them) and its projection."""
    for n in names:
        sd[f"{p}.{n}.weight"] = 0.1 * torch.randn(H, generator=g)
    sd[f"{p}.{proj}.weight"] = 0.2 * torch.randn(H, 2 * H, generator=g)


def save_tiny_layer_mtp(model_type: str, path: Path, seed: int = 0, depths: int = 1, **overrides: Any) -> Path:
    """A tiny checkpoint whose MTP layers follow its 3 layers as ``model.layers.{3+k}.*`` with their own
    enorm/hnorm/eh_proj/shared_head and embedding copy, as DeepSeek-V3 stores ``model.layers.61.*`` and
    GLM-4.5 ``model.layers.92.*``; routers and correction biases made decisive."""
    n = 3
    types = getattr(tiny_config(model_type, num_hidden_layers=n + depths, **overrides), "mlp_layer_types", None)
    if types and "sparse" in types and "sparse" not in types[:n]:  # the shrink left the main layers dense
        overrides = {"mlp_layer_types": ["dense"] + ["sparse"] * (n + depths - 1), **overrides}
    save_tiny(model_type, path, seed=seed, num_hidden_layers=n + depths, **overrides)
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    H = sd["model.embed_tokens.weight"].shape[1]
    for k in range(depths):
        p = f"model.layers.{n + k}"
        _extras(sd, p, H, g, ("enorm", "hnorm", "shared_head.norm"), "eh_proj")
        for name in ("enorm", "hnorm", "shared_head.norm"):
            sd[f"{p}.{name}.weight"] += 1.0  # DeepSeek's RMSNorm scales by the weight itself
        sd[f"{p}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
        sd[f"{p}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        for key in [k for k in sd if k.startswith(f"{p}.mlp.") and ".experts." not in k and "shared" not in k
                    and k.endswith("gate.weight") and sd[k].shape[0] == 8]:  # the router (DeepSeek, GLM, HY-V3)
            sd[key] = 2 * torch.randn(sd[key].shape, generator=g)
    for key in [k for k in sd if k.endswith(("e_score_correction_bias", "expert_bias"))]:
        sd[key] = 0.3 * torch.randn(sd[key].shape, generator=g)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=n, num_nextn_predict_layers=depths)
    for key, value in list(cfg.items()):  # per-layer lists (layer_types, mlp_layer_types, indexer_types) describe n layers
        if key.endswith("_types") and isinstance(value, list) and len(value) == n + depths:
            cfg[key] = value[:n]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def save_tiny_deepseek_mtp(path: Path, seed: int = 0, depths: int = 1) -> Path:
    return save_tiny_layer_mtp("deepseek_v3", path, seed, depths)


def save_tiny_qwen3_next_mtp(path: Path, seed: int = 0, model_type: str = "qwen3_next") -> Path:
    """A Qwen3-Next-shaped tiny checkpoint (Qwen3.5-MoE and Mellum store their MTP layers alike): 3 layers,
    then one MoE MTP layer stored as Qwen3-Next stores it: ``mtp.layers.0.*`` with ``mtp.fc``,
    ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden`` and ``mtp.norm``. The MTP layer has the
    attention and MLP types transformers' ``get_mtp_config`` gives it (full attention by default)."""
    from moe_slim.modeling.mtp import count_key, mtp_config
    from moe_slim.modeling.tiny import tiny_config

    main = tiny_config(model_type, layers=3)
    if "linear_attention" in (getattr(main, "layer_types", None) or []):  # hybrid as published: full attention last
        main.layer_types = ["linear_attention", "linear_attention", "full_attention"]
    mtp = mtp_config(main, 1, moe_type=(getattr(main, "mlp_layer_types", None) or [None])[-1])
    over: dict[str, Any] = {k: list(getattr(main, k))[:3] + [getattr(mtp, k)[0]] for k in ("layer_types", "mlp_layer_types")
                            if getattr(main, k, None) is not None}
    save_tiny(model_type, path, seed=seed, num_hidden_layers=4, **over)
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    H = sd["model.embed_tokens.weight"].shape[1]
    sd = {("mtp.layers.0." + k[len("model.layers.3."):] if k.startswith("model.layers.3.") else k): v
          for k, v in sd.items()}
    _extras(sd, "mtp", H, g, ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"), "fc")  # zero-centred norms
    sd["mtp.layers.0.mlp.gate.weight"] = 2 * torch.randn(sd["mtp.layers.0.mlp.gate.weight"].shape, generator=g)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=3, **{k: v[:3] for k, v in over.items()})
    cfg[count_key(main) or "mtp_num_hidden_layers"] = 1  # Qwen3-Next's config.json key, which transformers ignores
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def transformers_mtp(main_model: torch.nn.Module, path: Path) -> Any:
    """transformers' own ``MtpModel`` for ``main_model``, loaded from the checkpoint at ``path``.

    transformers finds MTP tensors with the published model's layer number (``model.layers.61``); a
    tiny checkpoint numbers them from its own layer count, so that regex is given here. A family whose
    config has no MTP fields (Qwen3-Next) gets transformers' defaults for them (one full-attention layer),
    as moe_slim builds it; the ``mtp.*`` layout is then in ``MtpModel``'s own conversion table."""
    import re

    from transformers.modeling_layers import MtpModel

    from moe_slim.modeling.mtp import mtp_of
    from moe_slim.modeling.shards import ShardedCheckpoint

    keys = ShardedCheckpoint(path).keys
    config = main_model.config
    built = mtp_of(main_model).config  # transformers' defaults where the family's config has no MTP fields
    n = built.num_hidden_layers
    if getattr(config, "num_mtp_layers", None) is None:
        config.num_mtp_layers = n
    for k in ("layer_types", "mlp_layer_types"):
        if getattr(config, k, None) is not None and getattr(config, f"mtp_{k}", None) is None:
            setattr(config, f"mtp_{k}", getattr(built, k))
    regex = MtpModel.get_mtp_weights_regex(main_model)
    if not any(k.startswith("model.layers.") and regex.search(k) for k in keys) and not any(
            k.startswith("mtp.") for k in keys):
        regex = re.compile("|".join(rf"^model\.layers\.{config.num_hidden_layers + k}\." for k in range(n)))
    original = MtpModel.get_mtp_weights_regex
    MtpModel.get_mtp_weights_regex = staticmethod(lambda m: regex)
    try:
        config.name_or_path = str(path)
        return MtpModel.from_pretrained(main_model, device_map={"": "cpu"}).float().eval()
    finally:
        MtpModel.get_mtp_weights_regex = original


def assert_agrees_with_config(path: Path, mtp_layers: int) -> None:
    """Every MoE layer's tensors on disk, MTP layers included, hold the config's expert count: router rows,
    correction bias, expert numbers; and the config's MTP count is the number of MTP layers stored."""
    from moe_slim.checkpoint.rewrite import check_expert_layout
    from moe_slim.families import family_of
    from moe_slim.modeling.loading import load_config
    from moe_slim.modeling.mtp import checkpoint_skeleton, count_key, mtp_of
    from moe_slim.modeling.ondisk import DiskLayout
    from moe_slim.modeling.shards import ShardedCheckpoint

    config = load_config(path)
    n = family_of(config).num_experts(config)
    ckpt = ShardedCheckpoint(path)
    model = checkpoint_skeleton(config, path)
    info = mtp_of(model)
    assert (len(info.depths) if info else 0) == mtp_layers
    assert getattr(config, count_key(config)) == mtp_layers
    layout = DiskLayout(model, ckpt.keys)
    check_expert_layout(ckpt, layout, n)
    routers = [d for d in layout.tensors.values() if d.role == "router"]
    assert {d.layer for d in routers} == {l.index for l in layout.layers}  # every layer's router (and biases)
    for d in routers:
        assert ckpt.entry(d.key).shape[0] == n, d.key


def router_keys(path: Path) -> list[str]:
    """The on-disk router tensors (weight, biases) of the checkpoint's last MoE layer (its MTP layer)."""
    from moe_slim.modeling.loading import load_config
    from moe_slim.modeling.mtp import checkpoint_skeleton
    from moe_slim.modeling.ondisk import DiskLayout
    from moe_slim.modeling.shards import ShardedCheckpoint

    layout = DiskLayout(checkpoint_skeleton(load_config(path), path), ShardedCheckpoint(path).keys)
    return [d.key for d in layout.of_layer(len(layout.layers) - 1, ("router",))]

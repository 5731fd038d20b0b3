"""Tiny checkpoints with MTP (next-n) layers on disk, and transformers' own MTP forward as the oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe_slim.modeling.tiny import save_tiny


def save_tiny_deepseek_mtp(path: Path, seed: int = 0, depths: int = 1) -> Path:
    """A DeepSeek-V3-shaped tiny checkpoint: 3 layers, then ``depths`` MTP layers stored as
    ``model.layers.{3+k}.*`` with their own enorm/hnorm/eh_proj/shared_head and embedding copy, as the
    published DeepSeek-V3 stores ``model.layers.61.*``; routers and correction biases made decisive."""
    n = 3
    save_tiny("deepseek_v3", path, seed=seed, num_hidden_layers=n + depths)
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    H = sd["model.embed_tokens.weight"].shape[1]
    for k in range(depths):
        p = f"model.layers.{n + k}"
        sd[f"{p}.enorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[f"{p}.hnorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[f"{p}.eh_proj.weight"] = 0.2 * torch.randn(H, 2 * H, generator=g)
        sd[f"{p}.shared_head.norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[f"{p}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
        sd[f"{p}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[f"{p}.mlp.gate.weight"] = 2 * torch.randn(sd[f"{p}.mlp.gate.weight"].shape, generator=g)
    for key in [k for k in sd if k.endswith("e_score_correction_bias")]:
        sd[key] = 0.3 * torch.randn(sd[key].shape, generator=g)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=n, num_nextn_predict_layers=depths)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def transformers_mtp(main_model: torch.nn.Module, path: Path) -> Any:
    """transformers' own ``MtpModel`` for ``main_model``, loaded from the checkpoint at ``path``.

    transformers finds MTP tensors with the published model's layer number (``model.layers.61``);
    a tiny checkpoint numbers them from its own layer count, so the regex is given here."""
    import re

    from transformers.modeling_layers import MtpModel

    from moe_slim.modeling.shards import ShardedCheckpoint

    n = main_model.config.num_hidden_layers
    depths = main_model.config.num_mtp_layers
    regex = re.compile("|".join(rf"^model\.layers\.{n + k}\." for k in range(depths)))
    assert any(regex.search(k) for k in ShardedCheckpoint(path).keys)
    original = MtpModel.get_mtp_weights_regex
    MtpModel.get_mtp_weights_regex = staticmethod(lambda m: regex)
    try:
        main_model.config.name_or_path = str(path)
        return MtpModel.from_pretrained(main_model, device_map={"": "cpu"}).float().eval()
    finally:
        MtpModel.get_mtp_weights_regex = original


def assert_agrees_with_config(path: Path, mtp_layers: int) -> None:
    """Every MoE layer's tensors on disk, MTP layers included, hold the config's expert count: router rows,
    correction bias, expert numbers; and the config's MTP count is the number of MTP layers stored."""
    from moe_slim.checkpoint.rewrite import check_expert_layout
    from moe_slim.families import family_of
    from moe_slim.modeling.loading import load_config
    from moe_slim.modeling.mtp import count_key, mtp_of, skeleton
    from moe_slim.modeling.ondisk import DiskLayout
    from moe_slim.modeling.shards import ShardedCheckpoint

    config = load_config(path)
    n = family_of(config).num_experts(config)
    ckpt = ShardedCheckpoint(path)
    model = skeleton(config, path)
    info = mtp_of(model)
    assert (len(info.depths) if info else 0) == mtp_layers
    assert getattr(config, count_key(config)) == mtp_layers
    layout = DiskLayout(model, ckpt.keys)
    check_expert_layout(ckpt, layout, n)
    routers = [d for d in layout.tensors.values() if d.role == "router"]
    assert len(routers) >= 2 * len(layout.layers)  # weight and correction bias of every layer
    for d in routers:
        assert ckpt.entry(d.key).shape[0] == n, d.key

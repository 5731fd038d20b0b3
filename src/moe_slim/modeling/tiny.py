"""Tiny randomly initialised models of every supported family, built from transformers configs.

No pretrained MoE can be downloaded here, so correctness is shown on these: the tests, the
benchmarks and the fallback demo build them offline in milliseconds.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from .per_layer import kept_layers

_DECODER = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(_DECODER, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "qwen2_moe": dict(_DECODER, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "olmoe": dict(_DECODER, num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "mixtral": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "deepseek_v2": dict(_DECODER, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0,
                        num_key_value_heads=4),
    "deepseek_v3": dict(_DECODER, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
                        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4),
    "gpt_oss": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(_DECODER, num_local_experts=8, num_experts_per_tok=2, input_jitter_noise=0.0,
                   router_jitter_noise=0.01),
    "switch_transformers": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, num_experts=8, expert_capacity=64, encoder_sparse_step=1,
                                decoder_sparse_step=1, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1),
    "nllb-moe": dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_experts=8,
                     encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, max_position_embeddings=128,
                     decoder_start_token_id=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     moe_token_dropout=0.2),
    # experts flat as [E*I, H] matrices, counts in ffn_config; transformers 5.24's default attn_config lacks the
    # rope_theta its attention reads, and its clip_qkv=None fails (real checkpoints state both)
    "dbrx": dict(vocab_size=128, d_model=32, n_heads=4, n_layers=2, max_seq_len=128, tie_word_embeddings=False,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
}

TINY_FAMILIES: tuple[str, ...] = tuple(TINY_CONFIGS)


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A small config of ``model_type`` (a transformers model_type), with overrides."""
    if model_type not in TINY_CONFIGS:
        return shrunk_config(model_type, **overrides)
    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny model of ``model_type`` in eval mode (deterministic per seed)."""
    from ..families import auto_class

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = auto_class(config).from_config(config)
    # Random init leaves routers near-uniform; spread them so that routing is decisive and varied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.zero_()
        _spread_constant_routers(model)
    return model.eval()


def _spread_constant_routers(model: PreTrainedModel) -> None:
    """Some families initialise router weights to zeros (AFMoE): every token then ties every expert and
    top-k picks by index. Give such routers random rows so that routing depends on the token, and a
    constant token -> experts table random distinct experts per token."""
    from ..errors import MoeSlimError
    from ..families import moe_layers

    try:
        layers = moe_layers(model)
    except MoeSlimError:  # a refused family: built for the test that refuses it
        return
    for layer in layers:
        w = layer.router_weight
        if w is not None and w.numel() and bool((w == w.reshape(-1)[0]).all()):
            w.normal_(0.0, 0.5)
        table = layer.token_table  # DeepSeek-V4's hash layers start with every token sent to expert 0
        if table is not None and table.numel() and bool((table == table.reshape(-1)[0]).all()):
            rows = torch.rand(table.shape[0], layer.num_experts).argsort(-1)[:, : table.shape[1]]
            table.copy_(rows.to(table.dtype))
        matrices = [p for p in layer.router.parameters() if p.dim() == 2]
        if len(matrices) > 1:  # a router MLP (Zaya) at init scores every expert alike to 1e-5: make it decisive
            for p in matrices:
                p.normal_(0.0, 2.0 * p.shape[1] ** -0.5)
        s = layer.expert_scale  # Gemma-4's per-expert scale starts at ones: vary it so that tests see it
        if s is not None and bool((s == s.reshape(-1)[0]).all()):
            s.uniform_(0.5, 1.5)


def tiny_tokenizer() -> Any:
    """A character-level tokenizer (ids < 100) built offline, with pad/eos/unk and the prompt tags."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny(model_type: str, path: Any, seed: int = 0, **overrides: Any) -> Any:
    """Write a tiny model of ``model_type`` with its tokenizer to ``path`` (for tests and demos)."""
    tok = tiny_tokenizer()
    overrides = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, **overrides}
    model = tiny_model(model_type, seed=seed, **overrides)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


#: Sizes that make any transformers config tiny (applied to the keys a config has).
SHRINK: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=12, shared_expert_intermediate_size=16,
    vocab_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_topk=2,
    moe_k=2, top_k_experts=2, moe_top_k=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, index_head_dim=8, index_n_heads=2, index_topk=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_head_dim=8, linear_num_heads=4, mamba_num_heads=4,
    mamba_head_dim=8, ssm_state_size=8, mamba_d_state=8, n_groups=1, chunk_size=8, mamba_dt_rank=4, sliding_window=16,
    shared_intermediate_size=16, moe_shared_expert_intermediate_size=16, swa_head_dim=8, swa_num_attention_heads=4,
    swa_num_key_value_heads=2, global_head_dim=8, num_global_key_value_heads=2, shared_experts_intermediate_size=16,
    ffn_hidden_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    unpadded_vocab_size=120,  # Inkling-2's head: checkpoints pad it to vocab_size
)
#: Per model type: what the generic shrink cannot guess (layer patterns, switches that turn MoE on).
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # per-layer config: the full-attention layer (the last of four) has wider heads, one key/value head and
    # keys that are its values, as Gemma-4's global layers do (the default's overrides name layers 5, 11, ...)
    "gemma4": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=12,
                   vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, attention_k_eq_v=True,
                   per_layer_config={3: dict(head_dim=16, num_key_value_heads=1)}),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=24),  # ZayaConfig validates top-1 on reload
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=8, mamba_d_head=8,
                             mamba_d_state=8),
    # moe_layers lists layer indices (not a per-layer pattern): three MoE layers around a dense one
    **dict.fromkeys(("llama4", "llama4_text"), dict(intermediate_size_mlp=48, moe_layers=[0, 2, 3])),
    "deepseek_v4": dict(o_lora_rank=8),  # its grouped output projection is o_groups x o_lora_rank wide (8 x 1024)
    "longcat_flash": dict(num_layers=2, zero_expert_num=3, qk_head_dim=16),  # derived keys: set, not shrunk
    # M-RoPE sections the modeling code defaults to (fitted to the tiny heads by shrunk_config)
    "qwen3_vl_moe": dict(mrope_section=[24, 20, 20]),
    "glm4v_moe": dict(mrope_section=[8, 12, 12]),
    "ernie4_5_vl_moe": dict(head_dim=16, mrope_section=[22, 22, 20]),  # height and width sections of one size
    "hy_v4_vl": dict(mrope_section=[12, 10, 10]),
    "glm5_next": dict(index_kpool=2, qk_rope_head_dim=0),  # index_topk a multiple of index_kpool; NoPE indexer
    "mistral4": dict(head_dim=16),  # qk_nope_head_dim + qk_rope_head_dim
    "step3p7": dict(sliding_window=16),
    "muse_spark": dict(moe_hidden_size=32),
    # the default config leaves mlp_layer_types None, which its decoder layers index
    **dict.fromkeys(("deepseek_ocr2", "unlimited_ocr"), dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                                                                    num_experts_per_tok=2)),
    "mistral_large4": dict(kv_source_layers=[0, 1, 2, 3]),  # every tiny layer owns its cache
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    # per-layer overrides, keyed by layer type: dots3 requires its sliding layers' head_dim to be
    # qk_nope + qk_rope, and their shrunk qk_nope (16) stays wider than the global one, as released
    "dots3_note": dict(per_layer_config={"sliding_attention": dict(head_dim=24)}),
}


#: Fields a default config may leave unset although its layers need them (dots1 has no expert count,
#: Hunyuan no head_dim, Qwen4-Exp's indexed layers no indexer sizes): set even where the default is None.
NEEDED: dict[str, Any] = dict(
    head_dim=8, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, indexer_n_heads=2, indexer_kv_heads=1,
    indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2,
)


def _shrunk(config: Any, values: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sizes of ``values`` (a config's dict, or one layer's overrides) made tiny. A per-layer value
    that differs from the global one in ``reference`` stays different, on the same side (x2 or /2)."""
    amap = getattr(config, "attribute_map", {})
    out: dict[str, Any] = {}
    for key, value in {**SHRINK, **NEEDED}.items():
        name = amap.get(key, key)
        if name not in values or isinstance(values[name], (dict, list)):
            continue
        if values[name] is None and key not in NEEDED:
            continue
        g = (reference or {}).get(name)
        if reference is not None and isinstance(g, int) and isinstance(values[name], int) and values[name] != g:
            value = value * 2 if values[name] > g else max(1, value // 2)
        out[name] = value
    merged = {**(reference or {}), **values, **out}
    heads = {"num_attention_heads", "num_key_value_heads"} & values.keys()
    if merged.get("kv_lora_rank") and "num_key_value_heads" in merged and heads:  # latent attention: every head
        out["num_key_value_heads"] = out.get("num_attention_heads", SHRINK["num_attention_heads"])  # has its keys
    return out


#: Sizes that make the other parts of an image-text model tiny (vision tower, projector, audio tower: every
#: sub-config beside the text config, nested ones too), applied to the keys each has.
SHRINK_TOWER: dict[str, Any] = dict(
    depth=1, num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, mlp_dim=64, projection_dim=32, projection_intermediate_size=64, output_channels=32,
    vocab_size=128, downsample_channels=[32, 32],
)


def _shrink(config: Any, sizes: dict[str, Any], layers: int) -> None:
    """Shrink ``config`` in place: every size of ``sizes`` it has, ``layers`` layers (or tower blocks) and per-layer
    lists cut to match, layer indices kept within them, nested sub-configs shrunk as towers."""
    d = config.to_dict()
    for key, value in sizes.items():
        current = d.get(key, getattr(config, key, None) if key in getattr(config, "attribute_map", {}) else None)
        if current is not None and not isinstance(current, dict) and isinstance(current, list) == isinstance(value, list):
            setattr(config, key, value)
    if d.get("kv_lora_rank") and "num_key_value_heads" in d:  # latent attention: every head has its keys
        config.num_key_value_heads = config.num_attention_heads
    if (d.get("n_group") or 1) > 1:
        config.n_group, config.topk_group = 2, 1
    for key in ("num_hidden_layers", "depth"):
        old = d.get(key)
        if isinstance(old, int):
            setattr(config, key, min(layers, old))
            for k, value in d.items():
                if isinstance(value, list) and len(value) == old and k != "rope_parameters":
                    kept = kept_layers([str(v) for v in value], min(layers, old))  # every kind it has
                    setattr(config, k, [value[i] for i in kept])
    for key in ("global_attn_indexes", "deepstack_visual_indexes"):  # layer indices of a tower: within its layers
        if isinstance(d.get(key), list):
            setattr(config, key, [i for i in d[key] if i < layers][:1])
    for name in getattr(config, "sub_configs", {}):  # a tower's own parts (SAM encoder beside a CLIP one)
        if getattr(config, name, None) is not None:
            _shrink(getattr(config, name), SHRINK_TOWER, 1)


def _fit_mrope(config: Any, sections: list[int]) -> None:
    """M-RoPE sections (time, height, width) summing to half the rotary size of the shrunk heads, in the
    proportions of the model's own (``sections``: the default its modeling code uses when the config has none)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    head = (getattr(config, "qk_rope_head_dim", None) or getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads)
    half = int(head * (rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0)) // 2
    old = rope.get("mrope_section") or sections
    new = [v * half // sum(old) for v in old]
    for i in range(half - sum(new)):
        new[i % len(new)] += 1
    rope["mrope_section"] = new
    config.rope_parameters = rope


def _tiny_text(config: Any, model_type: str, layers: int, asked: int | None, changes: dict[str, Any]) -> Any:
    """A language model's ``config`` with every size shrunk and ``layers`` layers of every kind it has
    (:mod:`.per_layer`; ``model_type`` names the class that can build it at other depths), ``changes`` over it.

    The result is rebuilt from its dict, as a saved checkpoint's config is on loading, so that what
    the class derives from the sizes (rotary fractions, head widths) is derived from the tiny ones."""
    from .per_layer import config_dict, cut_layers, per_layer_lists

    default = config_dict(config)
    d = {**default, **_shrunk(config, default)}
    group = config.attribute_map.get("n_group", "n_group")
    if (d.get(group) or 1) > 1:
        d[group], d["topk_group"] = 2, 1
    depth = d.get("num_hidden_layers")
    changes = dict(changes)
    if isinstance(depth, int):
        d["num_hidden_layers"] = n = min(asked or layers, depth)
        cut, per_layer = cut_layers(default, per_layer_lists(model_type, default, depth), depth, n)
        d.update(cut)
        if "per_layer_config" in d:
            d["per_layer_config"] = {i: {**o, **_shrunk(config, o, default)} for i, o in per_layer.items()}
    elif asked is not None:
        changes["num_hidden_layers"] = asked
    for key, value in changes.pop("per_layer_config", {}).items():  # keyed by layer index or by layer type
        for i, kind in enumerate(d.get("layer_types") or [None] * d["num_hidden_layers"]):
            if key in (i, kind):
                d.setdefault("per_layer_config", {}).setdefault(i, {}).update(value)
    sections = changes.pop("mrope_section", None)
    d.update(changes)
    if sections is not None:  # fitted before the class validates the sections against the tiny heads
        fitted = SimpleNamespace(**d)
        _fit_mrope(fitted, sections)
        d["rope_parameters"] = fitted.rope_parameters
    return type(config).from_dict(d)


def shrunk_config(model_type: str, layers: int = 4, **overrides: Any) -> Any:
    """The default config of any transformers ``model_type`` (its language model's when it has a causal-LM
    class) with every size shrunk and ``layers`` layers of every kind it has. For an image-text-only model:
    the whole model's config, its text config shrunk so and every other part (vision tower, projector) to
    one small layer; ``overrides`` apply to the text config."""
    from ..families import text_config
    from ..families.catalog import text_model_type
    from ..families.skeleton import image_text

    asked = overrides.pop("num_hidden_layers", None)  # a depth asked for cuts the per-layer fields to it
    changes = {**TINY_OVERRIDES.get(model_type, {}), **overrides}
    if not image_text(model_type) or text_config(whole := AutoConfig.for_model(model_type)) is whole:
        text = text_model_type(model_type) or model_type
        return _tiny_text(AutoConfig.for_model(text), text, layers, asked, changes)
    # a model type with a causal-LM class of its own that nests a text config (Qwen3.5-MoE, Llama-4) is
    # built as that language model, as transformers loads it; an image-text-only type as the whole model
    text = text_config(whole)
    tiny = _tiny_text(text, str(getattr(text, "model_type", model_type)), layers, asked, changes)
    name = next(k for k in getattr(whole, "sub_configs", {}) if getattr(whole, k, None) is text)
    setattr(whole, name, tiny)
    for sub_name in getattr(whole, "sub_configs", {}):
        sub = getattr(whole, sub_name, None)
        if sub is not None and sub is not tiny:
            _shrink(sub, SHRINK_TOWER, 1)
            for width in ("out_hidden_size", "text_hidden_size"):  # a tower's merger writes the language model's width
                if hasattr(sub, width):
                    setattr(sub, width, tiny.hidden_size)
    if hasattr(tiny, "tie_word_embeddings"):
        whole.tie_word_embeddings = tiny.tie_word_embeddings
    for key, value in whole.to_dict().items():  # the projector's own width sits on the whole model's config
        if key.startswith(("projector_", "projection_")) and isinstance(value, int) and value > 32:
            setattr(whole, key, 32)
    # built again from its dict: what the whole model's config derives from its parts (MiniMax-M3-VL's
    # merged_hidden_size) is derived from the shrunk parts
    return type(whole).from_dict(whole.to_dict())

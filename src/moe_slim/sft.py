"""Short supervised fine-tuning that heals a pruned or merged MoE (``moe-slim sft``).

    >>> result = sft(model, tok, "translation=0.8,general=0.2", steps=200, mode="experts", data_dir="data")
    >>> result.metrics_before["val_loss"], result.metrics_after["val_loss"]

Data is a mix spec over the built data's ``train`` split (the target domain plus optional general
replay), or records given directly. Records with ``prompt``/``target`` (translation, math) are
trained on the target tokens only: labels are -100 on the prompt and on padding. Records with only
``text`` (general, code) are trained on every token of one window of ``seq_len`` tokens.

Modes (what is trained):

* ``full``: every parameter.
* ``experts``: only the MoE experts and routers (and shared experts) of every MoE block, found
  through the family table (:func:`moe_slim.families.moe_layers`); attention, norms and
  embeddings stay frozen, so it works the same for every family.
* ``lora``: LoRA adapters (``peft``) on every ``nn.Linear`` except the output head and the
  routers: the attention projections, dense MLPs, shared experts and module-layout experts
  (Switch / NLLB-MoE). Fused 3-D experts (Qwen3-MoE, Mixtral, ...) are not ``nn.Linear`` and get
  no adapter unless ``lora_experts=True`` (``--lora-experts``), which adds a per-expert low-rank
  update to their 3-D weights through peft's ``target_parameters``. ``lora_targets`` overrides the
  linears chosen.

The loop uses :class:`accelerate.Accelerator` for device placement and gradient accumulation and
``transformers.get_scheduler`` for warm-up and decay. ``steps`` counts optimizer steps (each
``grad_accum`` micro-batches). Every ``eval_every`` steps the validation loss is measured on a
fixed slice of the ``validation`` split; training stops after ``patience`` evaluations without
improvement, and the best weights seen (the weights before training included) are restored, so
SFT never ends worse on validation loss than it started.

The model's structure and config are never changed: a pruned model keeps its experts per layer.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MoeSlimError

MODES: tuple[str, ...] = ("full", "experts", "lora")
MODE_ALIASES = {"experts-router": "experts", "experts_and_router": "experts", "experts-and-router": "experts"}
DEFAULT_LR = {"full": 5e-5, "experts": 1e-4, "lora": 2e-4}
SCHEDULERS: tuple[str, ...] = ("cosine", "linear", "constant_with_warmup")
IGNORE = -100


# --------------------------------------------------------------------------------------- data


@dataclass
class SftData:
    """Training and validation records per domain, with the mix weights."""

    train: dict[str, list[dict]]
    validation: dict[str, list[dict]]
    weights: dict[str, float]
    spec: str

    @property
    def domains(self) -> list[str]:
        return list(self.train)


def _check_records(records: Any, where: str) -> list[dict]:
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise MoeSlimError(f"{where}: give a list of records (dicts with 'prompt' and 'target', or 'text')")
    out = []
    for i, r in enumerate(records):
        if isinstance(r, str):
            r = {"text": r}
        ok = isinstance(r, Mapping) and (
            (isinstance(r.get("prompt"), str) and isinstance(r.get("target"), str)) or isinstance(r.get("text"), str))
        if not ok:
            raise MoeSlimError(f"{where}: record {i} has neither 'prompt'+'target' nor 'text' strings")
        out.append(dict(r))
    return out


def load_sft_data(data: Any, *, data_dir: str | os.PathLike = "data", val_data: Any = None,
                  seed: int = 0) -> SftData:
    """Resolve ``data`` into train/validation records per domain.

    ``data``: a mix spec (``"translation=0.8,general=0.2"``, a YAML path, a MixSpec or a
    ``{domain: weight}`` dict) read from ``<data_dir>/<domain>/{train,validation}.jsonl``; or a list
    of records; or ``{domain: [records]}`` (equal weights). Without a spec, validation records come
    from ``val_data`` or, failing that, a held-out tenth (at most 64) of the records.
    """
    from .data.jsonl import load_split
    from .data.mixspec import MixSpec, parse_mix

    if isinstance(data, Mapping) and data and all(isinstance(v, (int, float)) for v in data.values()):
        data = MixSpec({str(k): float(v) for k, v in data.items()})
    if isinstance(data, (str, os.PathLike, MixSpec)):
        mix = parse_mix(data)
        weights = {d: w for d, w in mix.normalized().weights.items() if w > 0}
        train, val = {}, {}
        for d in weights:
            train[d] = _check_records(load_split(data_dir, d, "train"), f"{data_dir}/{d}/train.jsonl")
            if not train[d]:
                raise MoeSlimError(f"{data_dir}/{d}/train.jsonl is empty: no SFT data for domain {d} "
                                   "(rebuild the data or drop the domain from the mix)")
            try:
                val[d] = _check_records(load_split(data_dir, d, "validation"), f"{data_dir}/{d}/validation.jsonl")
            except MoeSlimError:
                val[d] = []
        return SftData(train, val, weights, str(mix))
    if isinstance(data, Mapping):
        train = {str(k): _check_records(v, f"SFT data for {k}") for k, v in data.items()}
        weights = {k: 1.0 / len(train) for k in train}
        spec = "records:" + ",".join(train)
    else:
        train = {"data": _check_records(data, "SFT data")}
        weights = {"data": 1.0}
        spec = "records"
    if not train or any(not v for v in train.values()):
        raise MoeSlimError("SFT data is empty (give at least one record with 'prompt'+'target' or 'text')")
    if val_data is not None:
        val = ({str(k): _check_records(v, f"validation data for {k}") for k, v in val_data.items()}
               if isinstance(val_data, Mapping) else {next(iter(train)): _check_records(val_data, "validation data")})
    else:
        val = {}
        rng = random.Random(seed)
        for d, recs in train.items():
            n = min(64, len(recs) // 10)
            if n:
                order = list(range(len(recs)))
                rng.shuffle(order)
                held = set(order[:n])
                val[d] = [recs[i] for i in sorted(held)]
                train[d] = [r for i, r in enumerate(recs) if i not in held]
    return SftData(train, val, weights, spec)


def encode_record(tok: Any, rec: Mapping[str, Any], seq_len: int, rng: random.Random | None = None
                  ) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of one record: labels are -100 on prompt tokens.

    Prompt and target are tokenised separately (as evaluation sees the prompt), target first
    truncated to fit ``seq_len``. A ``text`` record gives one window of ``seq_len`` tokens (at a
    random offset when ``rng`` is given) trained on every token. None when nothing is left to learn.
    """
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("target"), str):
        p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        t = tok(rec["target"], add_special_tokens=False)["input_ids"]
        if len(p) >= seq_len:  # keep the end of the prompt (the instruction/tag sits there)
            p = p[-(seq_len // 2):]
        t = t[: seq_len - len(p)]
        if not t:
            return None
        return p + t, [IGNORE] * len(p) + t
    ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
    if len(ids) > seq_len:
        start = rng.randrange(len(ids) - seq_len + 1) if rng is not None else 0
        ids = ids[start:start + seq_len]
    if len(ids) < 2:
        return None
    return ids, list(ids)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class MixSampler:
    """Seeded micro-batches: each slot picks a domain by weight, then the next record of that
    domain's shuffled cycle."""

    def __init__(self, data: SftData, tok: Any, *, batch_size: int, seq_len: int, seed: int) -> None:
        self.data, self.tok, self.batch_size, self.seq_len = data, tok, batch_size, seq_len
        self.rng = random.Random(seed)
        self.domains = list(data.train)
        self.weights = [data.weights[d] for d in self.domains]
        self.orders: dict[str, list[int]] = {}
        self.pos: dict[str, int] = {}

    def _next(self, d: str) -> dict:
        recs = self.data.train[d]
        if self.pos.get(d, len(recs)) >= len(recs):
            order = list(range(len(recs)))
            self.rng.shuffle(order)
            self.orders[d], self.pos[d] = order, 0
        r = recs[self.orders[d][self.pos[d]]]
        self.pos[d] += 1
        return r

    def batch(self) -> dict[str, torch.Tensor]:
        out: list[tuple[list[int], list[int]]] = []
        tries = 0
        while len(out) < self.batch_size:
            tries += 1
            if tries > 50 * self.batch_size:
                raise MoeSlimError(f"SFT data gives no trainable tokens within seq_len={self.seq_len} "
                                   "(targets empty or prompts too long; raise --seq-len)")
            d = self.rng.choices(self.domains, self.weights)[0]
            ex = encode_record(self.tok, self._next(d), self.seq_len, self.rng)
            if ex is not None:
                out.append(ex)
        return collate(out, _pad_id(self.tok))


def _pad_id(tok: Any) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


def validation_batches(data: SftData, tok: Any, *, examples: int, batch_size: int, seq_len: int
                       ) -> list[dict[str, torch.Tensor]]:
    """A fixed validation set: the first records of each domain's validation split, shared out by
    the mix weights (``examples`` in all), as batches."""
    exs: list[tuple[list[int], list[int]]] = []
    for d, w in data.weights.items():
        recs = data.validation.get(d) or []
        want = max(1, round(examples * w)) if recs else 0
        for r in recs:
            if want <= 0:
                break
            ex = encode_record(tok, r, seq_len)
            if ex is not None:
                exs.append(ex)
                want -= 1
    exs.sort(key=lambda e: len(e[0]))  # less padding
    return [collate(exs[i:i + batch_size], _pad_id(tok)) for i in range(0, len(exs), batch_size)]


# --------------------------------------------------------------------------------------- loss


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100 (``sum`` or ``mean``)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=IGNORE, reduction=reduction)


def _is_encdec(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """The SFT loss of one batch (decoder-only: masked next-token loss; encoder-decoder: the
    prompt goes to the encoder and the target is the decoder's labels)."""
    if "dec_labels" in batch:
        out = model(input_ids=batch["enc_ids"], attention_mask=batch["enc_mask"], labels=batch["dec_labels"])
        if reduction == "sum":
            return out.loss * (batch["dec_labels"] != IGNORE).sum()
        return out.loss
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return masked_lm_loss(out.logits, batch["labels"], reduction)


def _to_encdec(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Split a decoder-only batch into encoder prompt and decoder target (prompt/target records)."""
    ids, labels = batch["input_ids"], batch["labels"]
    enc, dec = [], []
    for i in range(ids.shape[0]):
        n = int(batch["attention_mask"][i].sum())
        lab = labels[i, :n]
        k = int((lab == IGNORE).sum())
        if k == 0:
            raise MoeSlimError("encoder-decoder SFT needs prompt/target records (text-only data has no source side)")
        enc.append(ids[i, :k].tolist())
        dec.append(lab[k:].tolist())
    e = collate([(x, x) for x in enc], pad_id)
    d = collate([(x, x) for x in dec], pad_id)
    return {"enc_ids": e["input_ids"], "enc_mask": e["attention_mask"], "dec_labels": d["labels"]}


# --------------------------------------------------------------------------------------- modes


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA adapts: all but the output head and the routers."""
    from .families import family_of, moe_layers

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
    from .families import moe_layers

    names = []
    for layer in moe_layers(model):
        if layer.family.layout != "fused":
            continue
        for pname, p in layer.expert_params().items():
            if p.dim() == 3:
                names.append(f"{layer.name}.{layer.family.experts_attr}.{pname}")
    return names


def set_trainable(model: nn.Module, mode: str) -> int:
    """Freeze/unfreeze parameters for ``full`` or ``experts`` mode; returns the trainable count."""
    from .families import moe_layers

    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "experts":
        layers = moe_layers(model)  # one-line error for a model that is not a supported MoE
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            modules = [layer.experts, layer.router] + [getattr(layer.block, a) for a in layer.family.shared_attrs
                                                       if getattr(layer.block, a, None) is not None]
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


# --------------------------------------------------------------------------------------- result


@dataclass
class SftResult:
    """What an SFT run did. ``model`` is the trained model (a ``peft`` model for an unmerged LoRA run)."""

    model: Any = field(repr=False)
    mode: str
    data: str
    steps: int  # optimizer steps run
    max_steps: int
    best_step: int
    stopped_early: bool
    tokens: int
    seconds: float
    trainable_params: int
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    lora: dict[str, Any] | None = None
    merged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in self.__dict__.items() if k != "model"}, default=str))

    def metrics(self, prefix: str = "sft/") -> dict[str, float]:
        """Flat numbers for sweeps and reports."""
        out = {f"{prefix}steps": float(self.steps), f"{prefix}best_step": float(self.best_step),
               f"{prefix}tokens": float(self.tokens), f"{prefix}minutes": round(self.seconds / 60, 3),
               f"{prefix}trainable_params": float(self.trainable_params)}
        for k, v in self.metrics_before.items():
            out[f"{prefix}{k}_before"] = v
        for k, v in self.metrics_after.items():
            out[f"{prefix}{k}_after"] = v
        return out


# --------------------------------------------------------------------------------------- training


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: Any = None) -> float:
    """Mean loss per target token over the fixed validation batches."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            if device is not None:
                b = {k: v.to(device) for k, v in b.items()}
            if "dec_labels" in b:
                n = int((b["dec_labels"] != IGNORE).sum())
            else:
                n = int((b["labels"][:, 1:] != IGNORE).sum())
            total += float(batch_loss(model, b, "sum"))
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def _chrf(model: nn.Module, tok: Any, data_dir: Any, limit: int) -> float:
    from .evaluate import evaluate

    res = evaluate(model, tok, "quick", data_dir=data_dir, tasks=["translation"], limit=limit, bootstrap_samples=0,
                   hash_weights=False)
    return float(res["metrics"]["translation/chrf"])


def sft(
    model: nn.Module,
    tok: Any,
    data: Any,
    *,
    steps: int,
    mode: str = "experts",
    data_dir: str | os.PathLike = "data",
    val_data: Any = None,
    lr: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    seq_len: int = 256,
    warmup: int | float = 0.1,
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    eval_every: int | None = None,
    val_examples: int = 64,
    patience: int | None = 3,
    seed: int = 0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | None = None,
    lora_experts: bool = False,
    merge_lora: bool = False,
    chrf_limit: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SftResult:
    """Fine-tune ``model`` in place for at most ``steps`` optimizer steps and return an :class:`SftResult`.

    ``data``: a mix spec over ``data_dir``'s train split or records (see :func:`load_sft_data`).
    ``warmup``: steps, or a fraction of ``steps`` when < 1. ``eval_every``: validation interval in
    steps (default ``max(1, steps // 10)``); ``patience``: evaluations without improvement before
    stopping (None: never stop early). ``chrf_limit``: also measure chrF (sentences per pair) before
    and after when translation test data is in ``data_dir`` and the data has a translation domain.
    ``merge_lora``: fold LoRA weights into the model (``result.model`` is then a plain model).
    ``max_minutes``: also stop (after a final validation) once training has run this long.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    say = log or (lambda msg: None)
    mode = check_mode(mode)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    for name, v in (("batch size", batch_size), ("gradient accumulation", grad_accum), ("seq_len", seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise MoeSlimError(f"{name} must be a positive integer (got {v!r})")
    if seq_len < 2:
        raise MoeSlimError("seq_len must be at least 2")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise MoeSlimError(f"learning rate must be positive (got {lr})")
    if scheduler not in SCHEDULERS:
        raise MoeSlimError(f"unknown scheduler {scheduler!r} (choose from: {', '.join(SCHEDULERS)})")
    if eval_every is not None and eval_every <= 0:
        raise MoeSlimError(f"eval interval must be positive (got {eval_every})")
    if max_minutes is not None and not max_minutes > 0:
        raise MoeSlimError(f"max_minutes must be positive (got {max_minutes})")
    if patience is not None and patience <= 0:
        raise MoeSlimError(f"patience must be positive (got {patience}; leave it unset to never stop early)")
    if tok is None:
        raise MoeSlimError("SFT needs a tokenizer and this model has none (save one with the checkpoint)")
    if mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise MoeSlimError("LoRA mode needs the peft package (pip install peft)") from None
    sft_data = load_sft_data(data, data_dir=data_dir, val_data=val_data, seed=seed)
    lr = float(lr if lr is not None else DEFAULT_LR[mode])
    warm = int(round(warmup * steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    eval_every = eval_every or max(1, steps // 10)

    set_seed(seed)
    val_batches = validation_batches(sft_data, tok, examples=val_examples, batch_size=batch_size, seq_len=seq_len)
    want_chrf = (chrf_limit is not None and "translation" in sft_data.weights
                 and (Path(data_dir) / "translation" / "test.jsonl").is_file())

    before: dict[str, float] = {}
    if want_chrf:
        say(f"chrF before SFT ({chrf_limit} sentences per pair)")
        before["chrf"] = _chrf(model, tok, data_dir, chrf_limit)

    lora_info = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets) if lora_targets else lora_target_modules(model)
        expert_params = lora_expert_parameters(model) if lora_experts else []
        if expert_params and lora_dropout:
            raise MoeSlimError("LoRA on fused experts (--lora-experts) does not support dropout (set --lora-dropout 0)")
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                         target_parameters=expert_params or None, bias="none")
        model = get_peft_model(model, cfg)
        lora_info = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": targets,
                     "expert_parameters": expert_params}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        trainable = set_trainable(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MoeSlimError(f"nothing to train in mode {mode}")

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=warm, num_training_steps=steps)
    model, optimizer, sched = accelerator.prepare(model, optimizer, sched)
    device = accelerator.device
    encdec = _is_encdec(model)
    pad_id = _pad_id(tok)
    if encdec:
        val_batches = [_to_encdec(b, pad_id) for b in val_batches]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    history: list[dict[str, Any]] = []
    best_loss = validation_loss(model, val_batches, device) if val_batches else float("nan")
    before["val_loss"] = best_loss
    best_state, best_step, bad = (snapshot() if val_batches else None), 0, 0
    history.append({"step": 0, "val_loss": best_loss})
    say(f"SFT {mode}: {trainable:,} trainable parameters, {steps} steps x {grad_accum} x {batch_size}, lr {lr:g}, "
        f"data {sft_data.spec}; validation loss {best_loss:.4f}")

    sampler = MixSampler(sft_data, tok, batch_size=batch_size, seq_len=seq_len, seed=seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"sft {mode}", disable=not progress, dynamic_ncols=True)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    step, stopped, run_loss = 0, False, None
    try:
        while step < steps:
            micro_losses = []
            for _ in range(grad_accum):
                batch = sampler.batch()
                tokens += int(batch["attention_mask"].sum())
                if encdec:
                    batch = _to_encdec(batch, pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss = batch_loss(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    sched.step()
                    optimizer.zero_grad()
                micro_losses.append(float(loss.detach()))
            step += 1
            train_loss = sum(micro_losses) / len(micro_losses)
            if not math.isfinite(train_loss):
                raise MoeSlimError(f"training loss became {train_loss} at step {step} (lower the learning rate)")
            run_loss = train_loss if run_loss is None else 0.9 * run_loss + 0.1 * train_loss
            entry: dict[str, Any] = {"step": step, "train_loss": round(train_loss, 5), "lr": sched.get_last_lr()[0]}
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{run_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            out_of_time = max_minutes is not None and elapsed >= 60 * max_minutes
            if out_of_time and step < steps:
                entry["time_limit"] = True
                say(f"time limit of {max_minutes:g} min reached at step {step}")
            if val_batches and (step % eval_every == 0 or step == steps or out_of_time):
                vl = validation_loss(model, val_batches, device)
                entry["val_loss"] = vl
                if vl < best_loss:
                    best_loss, best_state, best_step, bad = vl, snapshot(), step, 0
                else:
                    bad += 1
                bar.set_postfix(loss=f"{run_loss:.3f}", val=f"{vl:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                if patience is not None and bad >= patience and step < steps:
                    stopped = True
                    entry["early_stop"] = True
                    history.append(entry)
                    say(f"early stop at step {step}: no validation improvement in {patience} evaluations")
                    break
            history.append(entry)
            if out_of_time:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model = accelerator.unwrap_model(model)
    model.eval()
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
    else:
        best_step = step
    if mode != "lora":
        for p in model.parameters():
            p.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    accelerator.free_memory()

    merged = False
    if mode == "lora" and merge_lora:
        model = model.merge_and_unload()
        merged = True
    after: dict[str, float] = {}
    if want_chrf:
        say(f"chrF after SFT ({chrf_limit} sentences per pair)")
        after["chrf"] = _chrf(model, tok, data_dir, chrf_limit)
    after["val_loss"] = best_loss
    settings = {"lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "warmup": warm,
                "scheduler": scheduler, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                "eval_every": eval_every, "val_examples": val_examples, "patience": patience, "seed": seed,
                "chrf_limit": chrf_limit, "max_minutes": max_minutes, "weights": sft_data.weights, "device": str(device)}
    say(f"SFT done: {step} steps in {seconds / 60:.1f} min, best validation loss {best_loss:.4f} at step {best_step}")
    return SftResult(model=model, mode=mode, data=sft_data.spec, steps=step, max_steps=steps, best_step=best_step,
                     stopped_early=stopped, tokens=tokens, seconds=round(seconds, 2), trainable_params=trainable,
                     settings=settings, history=history, metrics_before=before, metrics_after=after,
                     lora=lora_info, merged=merged)


# --------------------------------------------------------------------------------------- sweeps


RECOVER_KEYS = {"steps", "data", "mode", "lr", "batch_size", "grad_accum", "seq_len", "warmup", "scheduler",
                "weight_decay", "eval_every", "val_examples", "patience", "seed", "lora_r", "lora_alpha",
                "lora_dropout", "lora_experts", "chrf_limit", "max_minutes"}
DEFAULT_RECOVER_DATA = "translation=0.8,general=0.2"


def recover(model: nn.Module, tok: Any, spec: Mapping[str, Any] | None, data_dir: str | os.PathLike = "data"
            ) -> dict[str, float]:
    """The sweep stage ``recover: {sft: {...}}``: fine-tune ``model`` in place, return flat metrics.

    ``spec`` takes :func:`sft`'s keyword names (``steps`` required; ``data`` defaults to
    ``translation=0.8,general=0.2``, ``mode`` to ``experts``). A LoRA run is always merged into
    the weights, so ``model`` stays a plain transformers model. No progress bar.
    """
    spec = dict(spec or {})
    if "sft" in spec and isinstance(spec["sft"], Mapping):
        spec = dict(spec["sft"])
    unknown = sorted(set(spec) - RECOVER_KEYS)
    if unknown:
        raise MoeSlimError(f"unknown key(s) {', '.join(unknown)} in recover.sft (known: {', '.join(sorted(RECOVER_KEYS))})")
    if "steps" not in spec:
        raise MoeSlimError("recover.sft needs steps (e.g. recover: {sft: {steps: 200}})")
    data = spec.pop("data", DEFAULT_RECOVER_DATA)
    result = sft(model, tok, data, data_dir=data_dir, progress=False, merge_lora=True, **spec)
    if result.model is not model:  # merge_and_unload hands back the same base module; be safe anyway
        model.load_state_dict(result.model.state_dict())
    return result.metrics()


# --------------------------------------------------------------------------------------- checkpoints


def sft_card(*, source: str, result: SftResult, adapter: bool) -> str:
    """A model card recording data, steps, mode and before/after metrics."""
    from .fingerprint import library_versions

    s = result.settings
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "---",
        "library_name: " + ("peft" if adapter else "transformers"),
        "tags: [moe_slim, sft, recovery, mixture-of-experts]",
        f"base_model: {source}" if adapter else None,
        "---",
        f"# {Path(str(source)).name} — SFT recovery with moe_slim",
        "",
        f"Source checkpoint: `{source}`.",
        "",
        "## Training",
        f"- Mode: `{result.mode}` ({result.trainable_params:,} trainable parameters)"
        + (f"; LoRA r={result.lora['r']}, alpha={result.lora['alpha']} on {len(result.lora['targets'])} linears"
           + (f" and {len(result.lora['expert_parameters'])} fused expert weights"
              if result.lora.get("expert_parameters") else "")
           if result.lora else ""),
        f"- Data: `{result.data}` (train split; validation on the validation split)",
        f"- Steps: {result.steps} of {result.max_steps} (batch {s['batch_size']} x accumulation {s['grad_accum']}, "
        f"seq_len {s['seq_len']}); best validation loss at step {result.best_step}"
        + (" (stopped early)" if result.stopped_early else ""),
        f"- Optimiser: AdamW lr {s['lr']:g}, {s['scheduler']} schedule, {s['warmup']} warm-up steps, seed {s['seed']}",
        f"- Tokens seen: {result.tokens:,}; training time: "
        + (f"{result.seconds:.0f} s" if result.seconds < 120 else f"{result.seconds / 60:.1f} min") + f" on {s['device']}",
        "",
        "## Metrics",
        "| metric | before SFT | after SFT |",
        "|---|---|---|",
    ]
    for k in sorted(set(result.metrics_before) | set(result.metrics_after)):
        lines.append(f"| {k} | {fmt(result.metrics_before.get(k))} | {fmt(result.metrics_after.get(k))} |")
    if result.settings.get("chrf_limit") and "chrf" in result.metrics_after:
        lines.append(f"\nchrF on the translation test split, first {s['chrf_limit']} sentences per pair.")
    if adapter:
        lines += ["", "## Loading",
                  "This directory holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`), "
                  f"not full weights. Its base is `{source}`:",
                  "```python",
                  "from peft import PeftModel",
                  "from moe_slim.loading import load_model",
                  f"base, tok = load_model({str(source)!r})",
                  "model = PeftModel.from_pretrained(base, OUT).merge_and_unload()",
                  "```",
                  "or rerun with `--merge-lora` to write merged weights."]
    lines += ["", "Training log: `sft.json` beside this card.", f"Libraries: `{library_versions()}`.", ""]
    return "\n".join(l for l in lines if l is not None)


def sft_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str,
    steps: int,
    mode: str = "experts",
    merge_lora: bool = False,
    overwrite: bool = False,
    device_map: str | None = None,
    **kwargs: Any,
) -> SftResult:
    """``moe-slim sft``: load, fine-tune, write a checkpoint (or adapter) with a model card, atomically."""
    from .checkpoint import save_checkpoint
    from .loading import load_model
    from .outputs import atomic_dir, check_output
    from .plan import ExpertPlan

    check_output(out, overwrite)
    mode = check_mode(mode)
    if not isinstance(steps, int) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    model, tok = load_model(model_path, device_map=device_map)
    result = sft(model, tok, data, steps=steps, mode=mode, merge_lora=merge_lora, **kwargs)
    source = str(model_path)
    log_json = result.to_dict()
    log_json["source"] = source
    if mode == "lora" and not result.merged:
        card = sft_card(source=source, result=result, adapter=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            result.model.peft_config["default"].base_model_name_or_path = os.path.abspath(source)
            result.model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            (tmp / "sft.json").write_text(json.dumps(log_json, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(card)
        return result
    plan = None
    plan_path = Path(model_path) / "plan.json"
    if plan_path.is_file():
        try:
            plan = ExpertPlan.load(plan_path)
        except Exception:
            plan = None
    save_checkpoint(result.model, tok, out, card=sft_card(source=source, result=result, adapter=False), plan=plan,
                    extra_json={"sft.json": log_json},
                    overwrite=overwrite)
    return result

"""``moe-slim train-reference``: train the reference MoE deterministically (on the GPU when present).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM

from .recipe import (
    DOMAINS,
    Recipe,
    _read_texts,
    _stream,
    build_model,
    copied_pairs,
    train_tokenizer,
    training_loss,
)


def train_reference(
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike = "data",
    recipe: Recipe | None = None,
    overwrite: bool = False,
    device: str | None = None,
    log_every: int = 50,
    resume_from: str | os.PathLike | None = None,
    on_step: Callable[[str, int, Any, Any], None] | None = None,
) -> dict[str, Any]:
    """Train the reference MoE and write checkpoint + tokenizer to ``out`` (atomically).

    ``on_step(phase, step, model, tokenizer)`` is called after every optimiser step (the model is in
    train mode; a callback that evaluates must switch to eval and back itself).
    """
    from ..outputs import atomic_dir, check_output

    recipe = recipe or Recipe()
    check_output(out, overwrite, inputs=[data_dir])
    data = Path(data_dir)
    texts = {d: _read_texts(data, d, "train", recipe.max_docs_per_domain) for d in DOMAINS}
    texts["translation"] += copied_pairs(data, recipe.copy_fraction, recipe.seed)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    if not resume_from:
        tok_corpus = [t for d in DOMAINS for t in texts[d][:20000]]
        tok = train_tokenizer(tok_corpus, recipe.vocab_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resume_from:  # phase 1 already trained by this recipe: continue from its checkpoint
        tok = PreTrainedTokenizerFast.from_pretrained(str(resume_from))
        model = Qwen3MoeForCausalLM.from_pretrained(str(resume_from), dtype=torch.float32, use_safetensors=True).to(dev)
    else:
        model = build_model(recipe, tok).to(dev)
    streams = {d: _stream(tok, texts[d], recipe.seed + i, recipe.target_only_loss and d == "translation")
               for i, d in enumerate(DOMAINS)}
    model.config.output_router_logits = True
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    if dev.type == "cpu":  # grouped matmuls: ~10% faster steps than the per-expert loop on CPU
        model.config._experts_implementation = "grouped_mm"
    callback_seconds = 0.0
    g = torch.Generator().manual_seed(recipe.seed)
    offsets = {d: 0 for d in DOMAINS}
    log: list[dict[str, float]] = []
    L = recipe.seq_len
    phases = [("1", 0 if resume_from else recipe.steps, recipe.domain_weights, lr_at)]
    if recipe.phase2_steps:
        def lr2(step: int) -> float:
            frac = step / max(1, recipe.phase2_steps - 1)
            return recipe.phase2_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        phases.append(("2", recipe.phase2_steps, recipe.phase2_weights, lr2))
    for phase, n_steps, dom_weights, schedule in phases:
        weights = torch.tensor(dom_weights, dtype=torch.float)
        for step in range(n_steps):
            doms = torch.multinomial(weights, recipe.batch_size, replacement=True, generator=g).tolist()
            rows, targets = [], []
            for di in doms:
                d = DOMAINS[di]
                ids, predict = streams[d]
                if offsets[d] + L + 1 > len(ids):
                    offsets[d] = 0
                window = slice(offsets[d], offsets[d] + L)
                rows.append(ids[window])
                targets.append(torch.where(predict[window], ids[window], -100))
                offsets[d] += L
            batch = torch.stack(rows).to(dev)
            labels = torch.stack(targets).to(dev)
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            out_ = model(input_ids=batch)
            loss = training_loss(out_, labels, recipe.label_smoothing, recipe.router_aux_loss_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if on_step is not None:
                t_cb = time.perf_counter()
                on_step(phase, step, model, tok)
                callback_seconds += time.perf_counter() - t_cb
            if step % log_every == 0 or step == n_steps - 1:
                entry = {"phase": phase, "step": step, "loss": round(float(loss.detach()), 4),
                         "aux": round(float((out_.aux_loss if out_.aux_loss is not None else torch.zeros(())).detach()), 4),
                         "lr": schedule(step), "seconds": round(time.perf_counter() - t0 - callback_seconds, 1)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
    model.eval()
    model.config.output_router_logits = False
    model = model.to("cpu").to(torch.bfloat16)
    seconds = time.perf_counter() - t0 - callback_seconds
    if resume_from:  # count the phase-1 run this continues
        seconds += json.loads((Path(resume_from) / "training.json").read_text())["train_seconds"]
    info = {"recipe": asdict(recipe), "train_seconds": round(seconds, 1), "device": str(dev),
            "threads": torch.get_num_threads(), "log": log,
            "tokens_seen": (recipe.steps + recipe.phase2_steps) * recipe.batch_size * recipe.seq_len,
            "resumed_phase1_from": str(resume_from) if resume_from else None,
            "train_docs": {d: len(texts[d]) for d in DOMAINS}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
    return info

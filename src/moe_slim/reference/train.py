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
    upcycle,
)


def _machine_load(load_start: tuple[float, float, float], cpu_start: float, wall: float) -> dict[str, Any]:
    """What the machine was doing: cores, load averages at start and end, and the CPU time this process
    got per wall second (with T threads on an idle machine it approaches T)."""
    return {"cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "cpu_seconds_per_wall_second": round((time.process_time() - cpu_start) / max(wall, 1e-9), 2)}


def train_reference(
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    device: str | None = None,
    log_every: int = 50,
    resume_from: str | os.PathLike | None = None,
    on_step: Callable[[str, int, Any, Any], None] | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Train the reference MoE and write checkpoint + tokenizer to ``out`` (atomically).

    ``on_step(phase, step, model, tokenizer)`` is called after every optimiser step (the model is in
    train mode; a callback that evaluates must switch to eval and back itself). With ``max_seconds``,
    the MoE phases stop early once that much time has passed, and ``training.json`` says where.
    """
    from ..checkpoint.save import tidy_checkpoint_files
    from ..modeling.devices import resolve_device
    from ..outputs import atomic_dir, check_output

    from ..data.paths import data_dir_or_default

    recipe = recipe or Recipe()
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[data_dir], kind="reference")
    dev = resolve_device(device)  # a GPU asked for on a machine without one: one line, before the data loads
    data = Path(data_dir)
    texts = {d: _read_texts(data, d, "train", recipe.max_docs_per_domain, recipe.seed) for d in DOMAINS}
    texts["translation"] += copied_pairs(data, recipe.copy_fraction, recipe.seed)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    load_start, cpu_start = os.getloadavg(), time.process_time()
    if not resume_from:
        tok_corpus = [t for d in DOMAINS for t in random.Random(recipe.seed).sample(texts[d], min(20000, len(texts[d])))]
        tok = train_tokenizer(tok_corpus, recipe.vocab_size)
    if resume_from:  # phase 1 already trained by this recipe: continue from its checkpoint
        tok = PreTrainedTokenizerFast.from_pretrained(str(resume_from))
        model = Qwen3MoeForCausalLM.from_pretrained(str(resume_from), dtype=torch.float32, use_safetensors=True).to(dev)
    elif recipe.dense_steps:
        model = build_model(recipe, tok, dense=True).to(dev)
    else:
        model = build_model(recipe, tok).to(dev)
    streams = {d: _stream(tok, texts[d], recipe.seed + i, recipe.target_only_loss and d == "translation")
               for i, d in enumerate(DOMAINS)}

    def cosine(peak: float, n: int, warmup: int) -> Callable[[int], float]:
        def lr(step: int) -> float:
            if step < warmup:
                return peak * (step + 1) / warmup
            frac = (step - warmup) / max(1, n - warmup)
            return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        return lr

    callback_seconds = 0.0
    g = torch.Generator().manual_seed(recipe.seed)
    offsets = {d: 0 for d in DOMAINS}
    log: list[dict[str, float]] = []
    phase_seconds: dict[str, float] = {}
    stopped_early: dict[str, int] | None = None
    steps_done = 0
    L = recipe.seq_len
    phases = []
    if recipe.dense_steps and not resume_from:
        phases.append(("dense", recipe.dense_steps, recipe.domain_weights,
                       cosine(recipe.lr, recipe.dense_steps, recipe.warmup)))
    phases.append(("1", 0 if resume_from else recipe.steps, recipe.domain_weights,
                   cosine(recipe.lr, recipe.steps, recipe.warmup)))
    if recipe.phase2_steps:
        phases.append(("2", recipe.phase2_steps, recipe.phase2_weights, cosine(recipe.phase2_lr, recipe.phase2_steps, 1)))
    for phase, n_steps, dom_weights, schedule in phases:
        t_phase = time.perf_counter()
        if phase == "1" and recipe.dense_steps and not resume_from:
            model = upcycle(model, recipe, tok)
        moe = phase != "dense"
        model.config.output_router_logits = moe
        if dev.type == "cpu" and moe:  # grouped matmuls: ~10% faster steps than the per-expert loop on CPU
            model.config._experts_implementation = "grouped_mm"
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
        weights = torch.tensor(dom_weights, dtype=torch.float)
        for step in range(n_steps):
            if moe and max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped_early = {"phase": phase, "steps_done": step, "steps_planned": n_steps}
                print(json.dumps({"stopped_early": stopped_early}), flush=True)
                break
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
            steps_done += 1
            if on_step is not None:
                t_cb = time.perf_counter()
                on_step(phase, step, model, tok)
                callback_seconds += time.perf_counter() - t_cb
            if step % log_every == 0 or step == n_steps - 1:
                aux = getattr(out_, "aux_loss", None)
                entry = {"phase": phase, "step": step, "loss": round(float(loss.detach()), 4),
                         "aux": round(float((aux if aux is not None else torch.zeros(())).detach()), 4),
                         "lr": schedule(step), "seconds": round(time.perf_counter() - t0 - callback_seconds, 1)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
        phase_seconds[phase] = round(time.perf_counter() - t_phase, 1)
    model.eval()
    model.config.output_router_logits = False
    model = model.to("cpu").to(torch.bfloat16)
    seconds = time.perf_counter() - t0 - callback_seconds
    if resume_from:  # count the phase-1 run this continues
        seconds += json.loads((Path(resume_from) / "training.json").read_text())["train_seconds"]
    info = {"recipe": asdict(recipe), "train_seconds": round(seconds, 1), "device": str(dev),
            "threads": torch.get_num_threads(), "log": log, "phase_seconds": phase_seconds,
            "stopped_early": stopped_early,
            "machine": _machine_load(load_start, cpu_start, seconds),
            "tokens_seen": steps_done * recipe.batch_size * recipe.seq_len,
            "resumed_phase1_from": str(resume_from) if resume_from else None,
            "train_docs": {d: len(texts[d]) for d in DOMAINS}}
    with atomic_dir(out, overwrite=overwrite, kind="reference") as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        tidy_checkpoint_files(tmp)  # generation stops at <|end|>; no machine-local tokenizer keys
    return info

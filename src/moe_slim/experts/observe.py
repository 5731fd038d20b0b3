"""Run calibration text through a model and return per-domain router statistics.

What is recorded, and how, is :mod:`moe_slim.experts.recorder`; how text becomes batches is
:mod:`moe_slim.experts.batches`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MoeSlimError
from ..families import check_uniform, moe_layers
from ..fingerprint import library_versions, model_fingerprint
from .batches import make_batches, run_batch
from .recorder import Recorder, observing
from .samples import SAMPLE_FIELDS
from .stats import RouterStats


def observe(
    model: nn.Module,
    tokenizer: Any,
    calibration: dict[str, list[str]],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    progress: bool = False,
    samples: int = 0,
) -> RouterStats:
    """Run calibration text through ``model`` and return per-domain router statistics.

    ``calibration`` maps a domain name (general, math, code, translation or any other) to texts.
    ``max_tokens`` caps real tokens per domain (an int for all, or per domain). ``samples=N`` also
    keeps a token sample of at most N tokens per domain and MoE layer (inputs, router logits,
    routing weights) for expert merging; it costs ``N x hidden`` values per domain and layer.
    """
    if samples < 0:
        raise MoeSlimError(f"samples must be a non-negative number of tokens, not {samples}")
    if not calibration:
        raise MoeSlimError("no calibration text was given")
    layers = moe_layers(model)
    n_experts = check_uniform(layers)
    recorder = Recorder(layers, n_experts, samples=samples)
    batches = {}
    for domain, texts in calibration.items():
        cap = max_tokens.get(domain) if isinstance(max_tokens, dict) else max_tokens
        batches[domain] = make_batches(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=cap, pack=pack)
        if not batches[domain]:
            raise MoeSlimError(f"calibration domain '{domain}' has no text (give a non-empty file)")
    start = time.perf_counter()
    total = sum(len(b) for b in batches.values())
    with torch.no_grad(), observing(model, recorder), tqdm(total=total, disable=not progress, desc="observe") as bar:
        for domain, dbatches in batches.items():
            recorder.begin(domain)
            for batch in dbatches:
                run_batch(model, batch, recorder)
                bar.update(1)
    meta = {
        "family": layers[0].family.name,
        "layers": [l.name for l in layers],
        "num_experts": n_experts,
        "top_k": layers[0].family.top_k(model.config),
        "model_fingerprint": model_fingerprint(model),
        "model_path": str(getattr(model.config, "_name_or_path", "")),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "seq_len": seq_len,
        "pack": pack,
        "tokens_per_domain": {d: float(t["tokens"].max()) for d, t in recorder.domains.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "versions": library_versions(),
    }
    sample_set = None
    if samples:
        sample_set = recorder.sample_set()
        meta["samples"] = {"per_domain": int(samples), "fields": list(SAMPLE_FIELDS),
                           "tokens": {d: int(min(samples, meta["tokens_per_domain"][d])) for d in recorder.domains}}
    return RouterStats(recorder.domains, meta, sample_set)

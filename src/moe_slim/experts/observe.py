"""Run calibration text through a model and return per-domain router statistics.

Two paths give the same statistics: :func:`observe` runs the whole (loaded) model; :func:`observe_layerwise`
keeps one transformer layer in memory at a time, reading it from the checkpoint's shards
(:mod:`moe_slim.experts.layerwise`), for models larger than memory. Either runs as one process or
as every rank of a torchrun/accelerate launch (:mod:`moe_slim.experts.distributed`): each rank
observes every ``world``-th batch and the sums are all-reduced. What is recorded, and how, is
:mod:`moe_slim.experts.recorder`; how text becomes batches is :mod:`moe_slim.experts.batches`.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MoeSlimError
from ..families import check_uniform, moe_layers
from ..fingerprint import library_versions, model_fingerprint
from ..modeling.dispatch import prepare_model
from .batches import Batch, calibration_batches, run_batch, stream_offsets
from .distributed import Dist, check_same, reduce_recorder
from .layerwise import Item, LayerwiseRunner, OutputCache, WorkDir, run_key
from .mtp_observe import final_hidden, observe_depth, observe_depths, runnable_depths
from .recorder import Recorder, observing
from .samples import SAMPLE_FIELDS
from .stats import RouterStats

DEFAULT_CACHE_BYTES = 2 * 2**30  # layer outputs kept in memory before they spill to the work directory


def calibration_items(batches: dict[str, list[Batch]], dist: Dist | None = None) -> list[Item]:
    """Every batch with its stream offset; under data parallelism, this rank's share (every world-th)."""
    items = [Item(d, b, off) for d, bs in batches.items() for b, off in zip(bs, stream_offsets(bs))]
    return items[dist.rank :: dist.world] if dist is not None else items


def _calibration_hash(batches: dict[str, list[Batch]]) -> str:
    h = hashlib.sha256()
    for d, bs in batches.items():
        h.update(d.encode())
        for b in bs:
            h.update(b.input_ids.numpy().tobytes())
            h.update(b.attention_mask.numpy().tobytes())
    return h.hexdigest()[:24]


def _begin(recorder: Recorder, item: Item) -> None:
    recorder.begin(item.domain)
    recorder.stream_start = item.offset
    flat = item.batch.attention_mask.reshape(-1).bool()
    recorder.masks = {"decoder": flat, "encoder": flat}


def _check_samples(samples: int) -> None:
    if samples < 0:
        raise MoeSlimError(f"samples must be a non-negative number of tokens, not {samples}")


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
    dist: Dist | None = None,
) -> RouterStats:
    """Run calibration text through ``model`` and return per-domain router statistics.

    ``calibration`` maps a domain name (general, math, code, translation or any other) to texts.
    ``max_tokens`` caps real tokens per domain (an int for all, or per domain). ``samples=N`` also
    keeps a token sample of at most N tokens per domain and MoE layer (inputs, router logits,
    routing weights) for expert merging; it costs ``N x hidden`` values per domain and layer.
    """
    _check_samples(samples)
    batches = calibration_batches(tokenizer, calibration, seq_len=seq_len, batch_size=batch_size,
                                  max_tokens=max_tokens, pack=pack)
    layers = moe_layers(model)
    recorder = Recorder(layers, check_uniform(layers), samples=samples)
    for d in batches:
        recorder.begin(d)
    items = calibration_items(batches, dist)
    if dist is not None:
        check_same(dist, "calibration text or model", f"{_calibration_hash(batches)} {model_fingerprint(model)}")
    start = time.perf_counter()
    depths = runnable_depths(model)  # MTP layers run after the main model, on its final hidden state
    with torch.no_grad(), observing(model, recorder), final_hidden(model) as last, \
            tqdm(total=len(items), disable=not progress, desc="observe") as bar:
        for item in items:
            _begin(recorder, item)
            run_batch(model, item.batch, recorder)
            if depths:
                observe_depths(model, item.batch, last["h"], recorder, depths)
            bar.update(1)
    return _finish(recorder, model, tokenizer, seq_len=seq_len, pack=pack, samples=samples, start=start, dist=dist)


def observe_layerwise(
    model_path: str | os.PathLike,
    tokenizer: Any,
    calibration: dict[str, list[str]],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    progress: bool = False,
    samples: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    work_dir: str | os.PathLike | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    dist: Dist | None = None,
) -> RouterStats:
    """:func:`observe` with one transformer layer in memory at a time, read from the checkpoint's shards.

    Peak memory is one layer's weights, the embeddings and norms, and each batch's output of the
    current layer (``cache_bytes`` in memory, the rest in ``work_dir``). With ``work_dir`` every
    finished layer is saved there, and a run started again with the same model, text and settings
    continues after the last finished layer; the directory is removed when the run completes.
    """
    from ..modeling.loading import load_config
    from ..modeling.materialize import WeightSource
    from ..modeling.mtp import checkpoint_skeleton
    from ..modeling.ondisk import quant_method

    _check_samples(samples)
    config = load_config(model_path)
    if quant_method(config) is not None:
        raise MoeSlimError(f"{model_path} is quantized ({quant_method(config)}); layer-wise observation reads "
                           "unquantized safetensors weights (dequantize it first, or observe without --layerwise)")
    device = torch.device(device)
    model = prepare_model(checkpoint_skeleton(config, model_path))
    batches = calibration_batches(tokenizer, calibration, seq_len=seq_len, batch_size=batch_size,
                                  max_tokens=max_tokens, pack=pack)
    layers = moe_layers(model)
    recorder = Recorder(layers, check_uniform(layers), samples=samples)
    for d in batches:
        recorder.begin(d)
    items = calibration_items(batches, dist)
    fingerprint = model_fingerprint(model)
    if dist is not None:
        check_same(dist, "calibration text or model", f"{_calibration_hash(batches)} {fingerprint}")
    source = WeightSource(model_path, model)
    runner = LayerwiseRunner(model, source, items, device=device, dtype=dtype,
                             before_batch=lambda item: _begin(recorder, item))
    stacks = runner.stacks()
    work = None
    done: dict[str, Any] = {}
    if work_dir is not None:
        key = run_key(fingerprint, _calibration_hash(batches), seq_len, batch_size, pack, samples, str(dtype),
                      dist.rank if dist else 0, dist.world if dist else 1)
        work = WorkDir(work_dir, key)
        done = work.load() or {}
        if done:
            recorder.load_state_tensors(work.state_tensors())
        work.path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source.load_all_but(tuple(name for name, _ in stacks), device, dtype)
    position = (done.get("stack", 0), done.get("layer", -1))  # the last finished (stack, layer)
    cache = OutputCache.from_disk(work.path / "outputs", len(items), cache_bytes) if done else None
    encoder = OutputCache.from_disk(work.path / "encoder", len(items), cache_bytes) if done.get("encoder") else None
    depths = runnable_depths(model)
    total = (sum(len(mods) for _, mods in stacks) + depths) * len(items)
    finished = sum(len(mods) for _, mods in stacks[: position[0]]) + position[1] + 1
    with torch.no_grad(), observing(model, recorder), \
            tqdm(total=total, initial=finished * len(items), disable=not progress, desc="observe layer-wise") as bar:
        for si, (name, mods) in enumerate(stacks):
            if si > 0 and runner.encdec and encoder is None:  # the encoder is done: its output feeds the decoder
                encoder = OutputCache(work.outputs("encoder") if work else None, cache_bytes)
                for b in range(len(items)):
                    encoder.put(b, runner.encoder_output(stacks[0][1], cache, b))
                if work is not None:
                    os.replace(work.path / "outputs-encoder", work.path / "encoder")
                    encoder.directory = work.path / "encoder"
                    work.commit({"stack": si, "layer": -1, "encoder": True}, recorder.state_tensors(), None)
                cache = None
            for i in range(len(mods)):
                if (si, i) <= position:
                    continue
                bar.set_postfix_str(f"{name}.{i}")
                source.load(f"{name}.{i}", device, dtype)
                new = OutputCache(work.outputs(f"{si}-{i}") if work else None, cache_bytes)
                for b in range(len(items)):
                    new.put(b, runner.layer_outputs(si, mods, i, cache, b, encoder.get(b) if si > 0 and encoder else None))
                    bar.update(1)
                source.unload(f"{name}.{i}")
                cache = new
                if work is not None:
                    work.commit({"stack": si, "layer": i, "encoder": encoder is not None}, recorder.state_tensors(),
                                f"{si}-{i}")
                    cache.directory = work.path / "outputs"
        if depths and position < (len(stacks), depths - 1):
            cache = _mtp_stage(runner, source, recorder, stacks, cache, position, depths, work, bar)
    stats = _finish(recorder, model, tokenizer, seq_len=seq_len, pack=pack, samples=samples, start=start, dist=dist)
    stats.meta["layerwise"] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                               "resumed_after": list(position) if done else None}
    if work is not None:
        work.remove()
    return stats


def _mtp_stage(runner: LayerwiseRunner, source: Any, recorder: Recorder, stacks: list, cache: OutputCache,
               position: tuple[int, int], depths: int, work: WorkDir | None, bar: Any) -> OutputCache:
    """The MTP depths after the last layer: depth 0 reads the final hidden state, depth k the output of k - 1."""
    from ..modeling.mtp import load_mtp, unload_mtp

    si = len(stacks)
    load_mtp(source, runner.device, runner.dtype)
    try:
        for k in range(depths):
            if (si, k) <= position:
                continue
            bar.set_postfix_str(f"mtp.{k}")
            new = OutputCache(work.outputs(f"{si}-{k}") if work else None, cache.max_bytes)
            for b, item in enumerate(runner.items):
                _begin(recorder, item)
                previous = runner.final_hidden(stacks[-1][1], cache, b) if k == 0 else cache.get(b).to(runner.device)
                new.put(b, observe_depth(runner.model, k, item.batch, previous, recorder))
                bar.update(1)
            cache = new
            if work is not None:
                work.commit({"stack": si, "layer": k, "encoder": False}, recorder.state_tensors(), f"{si}-{k}")
                cache.directory = work.path / "outputs"
    finally:
        unload_mtp(source)
    return cache


def _finish(recorder: Recorder, model: nn.Module, tokenizer: Any, *, seq_len: int, pack: bool, samples: int,
            start: float, dist: Dist | None) -> RouterStats:
    """Sum the ranks' statistics (under data parallelism) and wrap them with what they were gathered on."""
    if dist is not None:
        reduce_recorder(dist, recorder)
    layers = recorder.layers
    meta = {
        "family": layers[0].family.name,
        "layers": [l.name for l in layers],
        "num_experts": recorder.n_experts,
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
    if dist is not None:
        meta["processes"] = dist.world
    sample_set = None
    if samples:
        sample_set = recorder.sample_set()
        meta["samples"] = {"per_domain": int(samples), "fields": list(SAMPLE_FIELDS),
                           "tokens": {d: int(min(samples, meta["tokens_per_domain"][d])) for d in recorder.domains}}
    return RouterStats(recorder.domains, meta, sample_set)

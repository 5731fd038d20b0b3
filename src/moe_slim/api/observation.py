"""``moe-slim observe``: record what every router did on calibration text, whole-model or layer-wise."""


from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.calib import calibration_inputs, calibration_texts
from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..experts import distributed
from ..experts.observe import DEFAULT_CACHE_BYTES, observe, observe_layerwise
from ..experts.stats import RouterStats
from ..families import family_of
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..modeling.loading import (
    load_config,
    load_model,
    load_tokenizer,
)
from ..modeling.shards import ITEMSIZE, ShardedCheckpoint, has_safetensors
from ..outputs import check_output


def observe_checkpoint(
    model_path: str | os.PathLike,
    calib: str | dict[str, list[str]],
    out: str | os.PathLike,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | dict[str, int] | None = None,
    pack: bool = True,
    device_map: str | None = None,
    data_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    samples: int = 0,
    layerwise: bool | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    work_dir: str | os.PathLike | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> RouterStats:
    """Observe a checkpoint on calibration text (a spec string or texts per domain) and save the stats.

    ``samples=N`` also keeps up to N tokens per domain and MoE layer for expert merging.
    ``layerwise`` keeps one transformer layer in memory at a time (default: when the model would
    not fit in the device's free memory); its progress is kept in ``work_dir`` (default: a hidden
    directory beside ``out``) so an interrupted run resumes. ``device``/``dtype``: where and in what
    precision the model runs (default: the GPU in the checkpoint's dtype, or float32 on a CPU).
    Under torchrun/accelerate with several processes each observes its share and rank 0 writes.
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    data_dir = data_dir_or_default(data_dir)
    check_output(out, overwrite, inputs=[model_path, data_dir, work_dir, *calibration_inputs(calib)], kind="stats")
    config = load_config(model_path)
    family_of(config)  # unsupported family: fail before loading weights
    texts, budget = calibration_texts(calib, data_dir)
    if max_tokens is None:
        max_tokens = budget
    dev = devices.resolve_device(device)
    dist = distributed.context(dev)
    if dist is not None and dev.type == "cuda":  # one GPU per process
        dev = devices.resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    run_dtype = devices.compute_dtype(dtype, dev, model_path)
    if layerwise is None:
        layerwise = device_map is None and has_safetensors(model_path) and needs_layerwise(model_path, run_dtype, dev)
    if layerwise and not has_safetensors(model_path):
        raise MoeSlimError(f"layer-wise observation reads safetensors weights and {model_path} has none "
                           "(convert it to safetensors, or observe without --layerwise)")
    if layerwise:
        tok = load_tokenizer(model_path)
    else:
        model, tok = load_model(model_path, device_map=device_map, dtype=run_dtype,
                                device=None if device_map else dev)
    if tok is None:
        raise MoeSlimError(f"{model_path} has no tokenizer; observation needs one to read calibration text")
    settings = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, pack=pack, progress=progress,
                    samples=samples, dist=dist)
    if layerwise:
        work = Path(work_dir) if work_dir is not None else Path(out).parent / f".{Path(out).name}.layerwise"
        if dist is not None:
            work = work.with_name(f"{work.name}-rank{dist.rank}")
        stats = observe_layerwise(model_path, tok, texts, device=dev, dtype=run_dtype, work_dir=work,
                                  cache_bytes=cache_bytes, **settings)
    else:
        stats = observe(model, tok, texts, **settings)
    stats.meta["model_path"] = str(model_path)
    stats.meta["calibration"] = calib if isinstance(calib, str) else "in-memory"
    if dist is None or dist.main:
        stats.save(out, overwrite=overwrite)
    return stats


def needs_layerwise(model_path: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the whole model in ``dtype`` would take more than 80% of the device's free memory."""
    ck = ShardedCheckpoint(model_path)
    elements = sum(e.nbytes // ITEMSIZE[e.dtype] for e in ck.entries.values())
    return elements * torch.tensor([], dtype=dtype).element_size() > 0.8 * devices.available_memory(device)

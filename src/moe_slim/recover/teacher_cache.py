"""The teacher's top-k next-token distributions, computed once and cached on disk (safetensors).

    >>> cache = build_teacher_cache("original/", tok, "translation=0.8,general=0.2", "teacher.safetensors",
    ...                             steps=300, layerwise=True)
    >>> sft(student, tok, "translation=0.8,general=0.2", steps=300, loss="kd", teacher=cache)

A recovery run draws its batches from a seeded sampler, so the batches of every step (and the fixed
validation batches) are known before training. The cache holds, for each of them, the token ids and
the teacher's ``k`` (64) most likely tokens per position with their log-probabilities (float16, int32:
6·k bytes per position). Training then needs only the student: the teacher and the student never share
memory, and every method trained on the same data, steps and seed reuses one cache.

Built with the teacher in memory, or (``layerwise=True``, from a checkpoint) streamed one transformer
layer at a time through :class:`~moe_slim.experts.layerwise.LayerwiseRunner`: building then holds one
teacher layer, the embeddings, the head and each batch's hidden states (spilled to a work directory
past ``cache_bytes``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import MoeSlimError
from ..fingerprint import model_fingerprint
from .data import MixSampler, load_sft_data, validation_batches
from .distill import DEFAULT_TOPK, ModelTeacher, TopK, top_k

CACHE_FORMAT = "moe_slim.teacher_topk/1"


def key_name(key: Any) -> str:
    """The tensor-name prefix of a batch: ``t<step>.<micro>`` for training, ``v<i>`` for validation."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "val":
        return f"v{key[1]}"
    if isinstance(key, tuple) and len(key) == 2:
        return f"t{key[0]}.{key[1]}"
    raise MoeSlimError(f"no cached teacher batch for key {key!r}")


def planned_batches(tok: Any, data: Any, *, steps: int, grad_accum: int, batch_size: int, seq_len: int, seed: int,
                    val_examples: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every batch :func:`~moe_slim.recover.loop.sft` will draw with these settings, by :func:`key_name`."""
    sampler = MixSampler(data, tok, batch_size=batch_size, seq_len=seq_len, seed=seed)
    out = {key_name((s, m)): sampler.batch() for s in range(steps) for m in range(grad_accum)}
    for i, b in enumerate(validation_batches(data, tok, examples=val_examples, batch_size=batch_size, seq_len=seq_len)):
        out[key_name(("val", i))] = b
    return out


class CachedTeacher:
    """A teacher read from a cache file: the stored top-k of the batch drawn at ``key``, after checking that
    the batch is the one the cache was built for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), "pt")
            self.meta = self._file.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for a bad file
            raise MoeSlimError(f"{self.path} is not a teacher cache ({type(exc).__name__})") from None
        if self.meta.get("format") != CACHE_FORMAT:
            raise MoeSlimError(f"{self.path} is not a teacher cache (format {self.meta.get('format')!r})")
        self.settings = json.loads(self.meta.get("settings", "{}"))

    def describe(self) -> dict[str, Any]:
        return {"kind": "top-k cache", "path": str(self.path), "fingerprint": self.settings.get("teacher"),
                "topk": self.settings.get("k")}

    def targets(self, batch: Mapping[str, torch.Tensor], key: Any = None) -> TopK:
        name = key_name(key)
        try:
            ids = self._file.get_tensor(f"{name}.ids")
        except Exception:
            raise MoeSlimError(f"teacher cache {self.path} has no batch {name} (built for other steps or "
                               "settings; rebuild it)") from None
        if ids.shape != batch["input_ids"].shape or not torch.equal(ids, batch["input_ids"].cpu()):
            raise MoeSlimError(f"teacher cache {self.path} was built for other batches than this run draws "
                               "(other data, seed, batch size or seq_len; rebuild it)")
        dev = batch["input_ids"].device
        return TopK(self._file.get_tensor(f"{name}.lp").to(dev), self._file.get_tensor(f"{name}.idx").to(dev))


def _stream_topk(path: str | os.PathLike, batches: list[dict[str, torch.Tensor]], k: int, *,
                 device: torch.device, dtype: torch.dtype, work: Path, cache_bytes: int) -> list[TopK]:
    """Top-k log-probabilities of a checkpoint on ``batches``, one transformer layer in memory at a time."""
    from ..experts.batches import Batch
    from ..experts.layerwise import Item, LayerwiseRunner, OutputCache
    from ..modeling.dispatch import prepare_model
    from ..modeling.loading import load_config
    from ..modeling.ondisk import meta_model, quant_method
    from ..modeling.materialize import WeightSource

    config = load_config(path)
    if quant_method(config) is not None or getattr(config, "is_encoder_decoder", False):
        raise MoeSlimError(f"a layer-wise teacher must be an unquantized decoder-only checkpoint ({path} is not)")
    model = prepare_model(meta_model(config))
    source = WeightSource(path, model)
    items = [Item("teacher", Batch(b["input_ids"], b["attention_mask"])) for b in batches]
    runner = LayerwiseRunner(model, source, items, device=device, dtype=dtype)
    (name, mods), = runner.stacks()
    source.load_all_but((name,), device, dtype)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    cache = None
    for i in range(len(mods)):
        source.load(f"{name}.{i}", device, dtype)
        new = OutputCache(Path(tempfile.mkdtemp(prefix=f"layer{i}-", dir=work)), cache_bytes)
        for b in range(len(items)):
            new.put(b, runner.layer_outputs(0, mods, i, cache, b))
        source.unload(f"{name}.{i}")
        cache = new
    if head.weight.device.type == "meta":  # untied: the head is loaded only now, after the last layer
        source.load(head_name, device, dtype)
    out = []
    for b in range(len(items)):
        logits = runner.model_output(mods, cache, b).logits
        out.append(top_k(torch.log_softmax(logits.float(), -1).cpu(), k))
    return out


def build_teacher_cache(
    teacher: nn.Module | str | os.PathLike,
    tok: Any,
    data: Any,
    path: str | os.PathLike,
    *,
    steps: int,
    k: int = DEFAULT_TOPK,
    grad_accum: int = 1,
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    val_examples: int = 64,
    data_dir: str | os.PathLike | None = None,
    val_data: Any = None,
    layerwise: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_bytes: int = 1 << 30,
) -> CachedTeacher:
    """Write (or reuse, when ``path`` holds one built with the same teacher and settings) the teacher's top-k
    on every batch of a recovery run with these settings, and return it as a teacher for :func:`sft`.

    ``teacher``: the unpruned model in memory, or its checkpoint directory (loaded whole, or streamed
    layer by layer with ``layerwise``). The settings must be the ones the run will use.
    """
    from ..experts.layerwise import run_key

    if not isinstance(k, int) or k < 1:
        raise MoeSlimError(f"top-k must be a positive integer (got {k!r})")
    sft_data = load_sft_data(data, data_dir=data_dir, val_data=val_data, seed=seed)
    fingerprint = teacher_fingerprint(teacher)
    settings = {"teacher": fingerprint, "data": sft_data.spec, "steps": steps, "grad_accum": grad_accum,
                "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "val_examples": val_examples, "k": k}
    key = run_key(settings)
    path = Path(path)
    if path.is_file():
        cached = CachedTeacher(path)
        if cached.meta.get("key") == key:
            return cached
    batches = planned_batches(tok, sft_data, steps=steps, grad_accum=grad_accum, batch_size=batch_size,
                              seq_len=seq_len, seed=seed, val_examples=val_examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".teacher-", dir=path.parent) as tmp:
        if isinstance(teacher, nn.Module) or not layerwise:
            if not isinstance(teacher, nn.Module):
                from ..modeling.loading import load_model

                teacher = load_model(teacher, dtype=dtype, device=torch.device(device))[0]
            mt = ModelTeacher(teacher, k)
            tops = [mt.targets(b) for b in batches.values()]
        else:
            tops = _stream_topk(teacher, list(batches.values()), k, device=torch.device(device), dtype=dtype,
                                work=Path(tmp), cache_bytes=cache_bytes)
        tensors: dict[str, torch.Tensor] = {}
        for (name, b), t in zip(batches.items(), tops):
            assert isinstance(t, TopK)
            tensors.update({f"{name}.ids": b["input_ids"].contiguous(), f"{name}.lp": t.logprobs.contiguous(),
                            f"{name}.idx": t.indices.contiguous()})
        part = Path(tmp) / "cache.safetensors"
        save_file(tensors, str(part), metadata={"format": CACHE_FORMAT, "key": key, "settings": json.dumps(settings)})
        os.replace(part, path)
    return CachedTeacher(path)


def teacher_fingerprint(teacher: nn.Module | str | os.PathLike) -> dict[str, Any]:
    """What identifies a teacher: its architecture fingerprint and its weights (their hash in memory; the
    safetensors files' names, sizes and modification times on disk, read without loading them)."""
    if isinstance(teacher, nn.Module):
        from ..fingerprint import weights_hash

        return {**model_fingerprint(teacher), "weights_hash": weights_hash(teacher)}
    from ..modeling.loading import load_config
    from ..modeling.ondisk import meta_model

    files = sorted(Path(teacher).glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    from ..experts.layerwise import run_key

    return {**model_fingerprint(meta_model(load_config(teacher))), "files": run_key(stamp)}

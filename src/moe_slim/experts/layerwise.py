"""Layer-wise forward passes: one transformer layer's weights in memory at a time.

The model is a meta-device skeleton (:func:`moe_slim.modeling.ondisk.meta_model`) whose embeddings
and norms are loaded (:meth:`~moe_slim.modeling.materialize.WeightSource.load_all_but`). For each
layer ``i`` of each stack (encoder first), its weights are read from the shards onto the compute
device, and every calibration batch runs through the model's own forward with two changes: layers
``j < i`` return the cached output of layer ``i - 1`` for that batch instead of computing, and a
hook stops the forward right after layer ``i``. So the model's code builds masks, rotary
embeddings and whatever a stack passes between layers (T5's position bias) exactly as in a
whole-model forward, and layer ``i`` sees exactly the inputs it would there. Its outputs become the
cache for layer ``i + 1``; its weights go back to the meta device. Recording hooks on routers and
experts (:func:`moe_slim.experts.recorder.observing`) fire as usual.

After every layer the cached outputs and the caller's partial state are written to a work
directory (:class:`WorkDir`), so an interrupted run resumes from the last finished layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..errors import MoeSlimError
from ..families import family_of, get_path
from ..modeling.materialize import WeightSource
from ..modeling.mtp import main_layer_count
from .batches import Batch

WORK_FORMAT = "moe_slim.layerwise/1"


@dataclass
class Item:
    """One calibration batch: its domain, tokens, and where its first real token sits in the domain's stream."""

    domain: str
    batch: Batch
    offset: int = 0


class _Stop(Exception):
    def __init__(self, output: Any) -> None:
        self.output = output


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    return obj


def _flatten(obj: Any, out: dict[str, torch.Tensor], path: str = "o") -> Any:
    """A layer's output as a JSON-able structure plus its tensors (for safetensors on disk)."""
    if isinstance(obj, torch.Tensor):
        out[path] = obj.contiguous()
        return {"t": path}
    if isinstance(obj, (tuple, list)):
        return {"seq": [_flatten(o, out, f"{path}.{i}") for i, o in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise MoeSlimError(f"a layer returned a {type(obj).__name__}, which layer-wise observation cannot cache")


def _unflatten(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "t" in spec:
        return tensors[spec["t"]]
    if "seq" in spec:
        items = [_unflatten(s, tensors) for s in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    return spec["v"]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


class OutputCache:
    """Each batch's output of the last finished layer: in memory up to ``max_bytes``, on disk past it
    (and always on disk when there is a work directory, so a run can resume)."""

    def __init__(self, directory: Path | None, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.memory: dict[int, Any] = {}
        self.bytes = 0
        self.on_disk: set[int] = set()

    def put(self, b: int, obj: Any) -> None:
        obj = _to(obj, "cpu")
        size = _nbytes(obj)
        if self.directory is not None:
            tensors: dict[str, torch.Tensor] = {}
            spec = _flatten(obj, tensors)
            save_file(tensors, str(self.directory / f"{b}.safetensors"), metadata={"spec": json.dumps(spec)})
            self.on_disk.add(b)
        if self.bytes + size <= self.max_bytes:
            self.memory[b] = obj
            self.bytes += size
        elif self.directory is None:
            raise MoeSlimError(f"the cached layer outputs exceed {self.max_bytes / 2**30:.1f} GiB and there is no "
                               "work directory to spill them to (give --work-dir)")

    def get(self, b: int) -> Any:
        if b in self.memory:
            return self.memory[b]
        path = self.directory / f"{b}.safetensors"  # type: ignore[operator]
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            spec = json.loads(f.metadata()["spec"])
        return _unflatten(spec, load_file(str(path)))

    @classmethod
    def from_disk(cls, directory: Path, n: int, max_bytes: int) -> OutputCache:
        cache = cls(directory, max_bytes)
        cache.on_disk = set(range(n))
        return cache


class WorkDir:
    """Where a layer-wise run keeps its progress: after each finished layer, the layer's outputs
    (``outputs/``) and the caller's state, under a key that must match to resume."""

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        """The saved progress, None for a fresh start; a one-line error if it belongs to another run."""
        state = self.path / "state.json"
        if not state.is_file():
            if self.path.exists():
                shutil.rmtree(self.path)  # a run killed before its first layer finished: nothing to keep
            return None
        try:
            saved = json.loads(state.read_text())
        except (OSError, ValueError):
            raise MoeSlimError(f"work directory {self.path} is corrupt; remove it to start again") from None
        if saved.get("format") != WORK_FORMAT or saved.get("key") != self.key:
            raise MoeSlimError(f"work directory {self.path} holds a layer-wise run of another model, text or "
                               "settings; remove it (rm -r) or choose another --work-dir")
        return saved

    def outputs(self, stage: str) -> Path:
        d = self.path / f"outputs-{stage}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def commit(self, progress: dict[str, Any], tensors: dict[str, torch.Tensor], stage: str | None) -> None:
        """Record a finished step: its outputs (in ``outputs-{stage}``; none for ``None``) become the current ones."""
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.path / "state.safetensors.tmp"))
        os.replace(self.path / "state.safetensors.tmp", self.path / "state.safetensors")
        current = self.path / "outputs"
        if current.exists():
            shutil.rmtree(current)
        if stage is not None:
            os.replace(self.path / f"outputs-{stage}", current)
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"format": WORK_FORMAT, "key": self.key, **progress}, indent=2))
        os.replace(tmp, self.path / "state.json")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "state.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def run_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _short_circuit(mods: nn.ModuleList, upto: int, cached: Any, stop_at: int | None) -> Iterator[None]:
    """Layers ``< upto`` return ``cached``; layer ``stop_at`` ends the forward with its output."""
    patched = []
    for j in range(upto):
        mods[j].forward = lambda *a, _c=cached, **k: _c
        patched.append(mods[j])
    handle = None
    if stop_at is not None:
        def stop(module: nn.Module, args: Any, output: Any) -> None:
            raise _Stop(output)

        handle = mods[stop_at].register_forward_hook(stop)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        if handle is not None:
            handle.remove()


class LayerwiseRunner:
    """Runs calibration batches through a skeleton model one layer at a time (see the module docstring)."""

    def __init__(self, model: nn.Module, source: WeightSource, items: list[Item], *, device: torch.device,
                 dtype: torch.dtype | None, before_batch: Callable[[Item], None] | None = None) -> None:
        self.model = model
        self.source = source
        self.items = items
        self.device = device
        self.dtype = dtype
        self.before_batch = before_batch
        self.family = family_of(model)
        self.encdec = bool(getattr(model.config, "is_encoder_decoder", False))

    def stacks(self) -> list[tuple[str, nn.ModuleList]]:
        out = []
        for name in self.family.layer_stacks:
            mods = get_path(self.model, name)
            if not isinstance(mods, nn.ModuleList):
                raise MoeSlimError(f"{name} is not a list of layers in this {self.family.name} model")
            out.append((name, mods[: main_layer_count(mods, self.model)]))  # grafted MTP layers run apart
        return out

    def _forward(self, stack_index: int, item: Item, encoder_out: Any) -> None:
        ids = item.batch.input_ids.to(self.device)
        mask = item.batch.attention_mask.to(self.device)
        if not self.encdec:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif stack_index == 0:
            self.model.get_encoder()(input_ids=ids, attention_mask=mask)
        else:
            self.model(attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=mask,
                       encoder_outputs=BaseModelOutput(last_hidden_state=_to(encoder_out, self.device)), use_cache=False)

    @torch.no_grad()
    def layer_outputs(self, stack_index: int, mods: nn.ModuleList, i: int, inputs: OutputCache | None,
                      b: int, encoder_out: Any = None) -> Any:
        """Batch ``b`` through layer ``i`` of a stack (layers before it replaced by ``inputs``)."""
        item = self.items[b]
        if self.before_batch is not None:
            self.before_batch(item)
        cached = _to(inputs.get(b), self.device) if inputs is not None and i > 0 else None
        with _short_circuit(mods, i, cached, i):
            try:
                self._forward(stack_index, item, encoder_out)
            except _Stop as stop:
                return stop.output
        raise MoeSlimError(f"layer {i} of {self.family.layer_stacks[stack_index]} never ran (unexpected model)")

    @torch.no_grad()
    def model_output(self, mods: nn.ModuleList, inputs: OutputCache, b: int) -> Any:
        """A decoder-only model's whole output for batch ``b`` (logits: final norm and head applied) from its
        last layer's output, every layer short-circuited."""
        item = self.items[b]
        with _short_circuit(mods, len(mods), _to(inputs.get(b), self.device), None):
            return self.model(input_ids=item.batch.input_ids.to(self.device),
                              attention_mask=item.batch.attention_mask.to(self.device), use_cache=False)

    @torch.no_grad()
    def final_hidden(self, mods: nn.ModuleList, inputs: OutputCache, b: int) -> torch.Tensor:
        """A decoder's final (normed) hidden states of batch ``b`` from its last layer's output (what MTP layers read)."""
        item = self.items[b]
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        with _short_circuit(mods, len(mods), _to(inputs.get(b), self.device), None):
            out = decoder(input_ids=item.batch.input_ids.to(self.device),
                          attention_mask=item.batch.attention_mask.to(self.device), use_cache=False)
        return out[0]

    @torch.no_grad()
    def encoder_output(self, mods: nn.ModuleList, inputs: OutputCache, b: int) -> torch.Tensor:
        """The encoder's final hidden states of batch ``b`` (after its last norm) from its last layer's output."""
        item = self.items[b]
        with _short_circuit(mods, len(mods), _to(inputs.get(b), self.device), None):
            out = self.model.get_encoder()(input_ids=item.batch.input_ids.to(self.device),
                                           attention_mask=item.batch.attention_mask.to(self.device))
        return out[0]

"""Fine-tuning a (slimmed) model on a labelled task as a standard sequence classifier.

ProbScale's claim is about task-specific slimming: keep the layers a task needs, then fine-tune the
small model on that task. Every plan (and the full model it is compared with) goes through the same
recipe here, so their accuracies are comparable: the model becomes transformers' own
``AutoModelForSequenceClassification`` for its family (BERT: pooler + linear on [CLS]; decoders: a linear
``score`` on the last non-pad token), the head is initialised from one seed, and the same steps, batches,
learning rates and trainable parts are used. Which parts train: the head, the final norm / pooler, and the
top ``train_layers`` kept layers (``None``: all kept layers); embeddings stay frozen. The result saves
with ``save_pretrained`` and loads with ``AutoModelForSequenceClassification`` and
``pipeline("text-classification")``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import MoeSlimError
from ..experts.batches import pad_rows
from .family import layer_list, present_stacks
from .features import SMALL_HIDDEN, _hidden_size
from .tasks import Task


@dataclass
class FinetuneConfig:
    """One fine-tuning recipe, applied unchanged to every plan compared."""

    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4          # kept layers, final norm, pooler
    head_lr: float = 1e-3     # the new classification head
    warmup: float = 0.1       # fraction of steps with a linear warm-up, then linear decay
    max_length: int = 64
    train_layers: int | None = None  # top kept layers that train (None: all); embeddings never train
    truncation: str = "left"  # long texts lose their start: pair tasks put what is judged at the end
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def readout_pooling(model: torch.nn.Module) -> str:
    """The token transformers' sequence classifier of this family reads, as a feature pooling.

    Encoder-only models (BERT, RoBERTa) classify from the first token ([CLS], through the pooler);
    decoders and encoder-decoders (Llama's ``score``, T5's eos state) from the last non-pad token.
    Probing that token asks what the fine-tuned classifier will read, not what a mean over tokens holds.
    """
    return "first" if [s.name for s in present_stacks(model)] == ["encoder"] else "last"


def to_classifier(model: torch.nn.Module, tokenizer: Any, labels: list[str], seed: int = 0) -> torch.nn.Module:
    """The family's ``*ForSequenceClassification`` around this model's (slimmed) base weights.

    The base weights are copied in exactly (strict load); the head is freshly initialised under ``seed``.
    """
    import copy

    import transformers

    config = copy.deepcopy(model.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {lab: i for i, lab in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(config, "moe_slim", None) is not None:
        del config.moe_slim
    config.architectures = None
    torch.manual_seed(seed)
    try:
        clf = transformers.AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise MoeSlimError(f"transformers has no sequence classifier for {config.model_type} models: "
                           f"{str(exc).splitlines()[0]}") from None
    dtype = next(model.parameters()).dtype
    clf.to(dtype)
    state = model.base_model.state_dict()
    missing, unexpected = clf.base_model.load_state_dict(state, strict=False)
    # the only base weights that may be new are a pooler the source model did not ship
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise MoeSlimError(f"the classifier's base does not match the model ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[0]})")
    return clf


def set_trainable(clf: torch.nn.Module, train_layers: int | None) -> dict[str, int]:
    """Freeze the embeddings and all but the top ``train_layers`` kept layers; returns parameter counts."""
    base = clf.base_model
    for p in clf.parameters():
        p.requires_grad_(True)
    frozen: set[int] = {id(p) for p in base.get_input_embeddings().parameters()}
    for name, mod in base.named_modules():
        if "embed" in name.split(".")[0]:
            frozen |= {id(p) for p in mod.parameters()}
    for stack in present_stacks(clf):
        layers = list(layer_list(clf, stack))
        n_train = len(layers) if train_layers is None else min(train_layers, len(layers))
        for layer in layers[: len(layers) - n_train]:
            frozen |= {id(p) for p in layer.parameters()}
    for p in clf.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in clf.parameters())}


def _encode(tokenizer: Any, texts: list[str], max_length: int, side: str = "left") -> list[list[int]]:
    old = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    finally:
        tokenizer.truncation_side = old


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def finetune(clf: torch.nn.Module, tokenizer: Any, task: Task, cfg: FinetuneConfig,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``clf`` on ``task`` (labels mapped by ``clf.config.label2id``) with ``cfg``; in place."""
    if cfg.steps < 1:
        raise MoeSlimError(f"fine-tuning needs at least one step (got {cfg.steps})")
    label2id = clf.config.label2id
    unknown = sorted(set(task.labels) - set(label2id))
    if unknown:
        raise MoeSlimError(f"task {task.name}: label {unknown[0]!r} is not one of the classifier's labels")
    counts = set_trainable(clf, cfg.train_layers)
    if _hidden_size(clf) <= SMALL_HIDDEN:
        torch.set_num_threads(1)  # as in feature extraction: threads only add overhead on tiny matrices
    ids = _encode(tokenizer, task.texts, cfg.max_length, cfg.truncation)
    y = torch.tensor([label2id[lab] for lab in task.labels])
    base = [p for n, p in clf.named_parameters() if p.requires_grad and n.startswith(clf.base_model_prefix + ".")]
    head = [p for n, p in clf.named_parameters() if p.requires_grad and not n.startswith(clf.base_model_prefix + ".")]
    opt = torch.optim.AdamW([{"params": base, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}], weight_decay=0.01)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    pad = _pad_id(tokenizer)
    clf.train()
    losses = []
    t0 = time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.permutation(len(ids)).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        x, m = pad_rows([ids[i] for i in idx], pad)
        out = clf(input_ids=x, attention_mask=m, labels=y[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([*base, *head], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if log and (step + 1) % max(1, cfg.steps // 4) == 0:
            log(f"fine-tune step {step + 1}/{cfg.steps}: loss {np.mean(losses[-10:]):.4f}")
    clf.eval()
    k = max(1, min(10, len(losses) // 4))
    return {**cfg.to_json(), **counts, "examples": len(ids), "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def predict(clf: torch.nn.Module, tokenizer: Any, texts: list[str], *, max_length: int = 64,
            batch_size: int = 32, truncation: str = "left") -> list[str]:
    """The classifier's label for each text."""
    clf.eval()
    ids = _encode(tokenizer, texts, max_length, truncation)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    pred = np.zeros(len(ids), dtype=int)
    pad = _pad_id(tokenizer)
    for s in range(0, len(ids), batch_size):
        chunk = order[s: s + batch_size]
        x, m = pad_rows([ids[i] for i in chunk], pad)
        pred[chunk] = clf(input_ids=x, attention_mask=m).logits.argmax(-1).numpy()
    return [clf.config.id2label[int(i)] for i in pred]


def correct(clf: torch.nn.Module, tokenizer: Any, task: Task, max_length: int = 64, truncation: str = "left"
            ) -> np.ndarray:
    """1.0 where the classifier labels a text of ``task`` right, else 0.0 (one entry per text)."""
    pred = predict(clf, tokenizer, task.texts, max_length=max_length, truncation=truncation)
    return np.array([float(p == t) for p, t in zip(pred, task.labels)])


def accuracy_interval(hits: np.ndarray) -> tuple[float, float]:
    """A Wilson 95% interval for an accuracy from per-item hits."""
    n = len(hits)
    if n == 0:
        return (math.nan, math.nan)
    p, z = float(np.mean(hits)), 1.96
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (c - h, c + h)

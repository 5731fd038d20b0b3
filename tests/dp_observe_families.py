"""Data-parallel observation of many tiny checkpoints in ONE launch (a helper of test_every_family_commands).

    python -m torch.distributed.run --nproc-per-node 2 tests/dp_observe_families.py ROOT TYPE [TYPE ...]

Every rank observes ``ROOT/TYPE/src`` for each model type, whole-model and layer-wise, with the
process group started once (gloo on CPUs); rank 0 writes ``ROOT/TYPE/dp_whole`` and ``dp_layerwise``.
A family that fails is written to ``ROOT/TYPE/dp_error.txt`` and the loop goes on: both ranks meet
the same error at the same place (before any collective), so neither is left waiting.
Starting the two processes once (not once per family) keeps the test's cost to seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: the calibration text and settings both this launch and the one-process reference observe
TEXTS = {"general": ["the cat sat on the mat and looked at 12 birds in the tree", "the dog ran to the sea"],
         "code": ["def f(x): return x * 2 + 1  # code", "for i in range(3): print(i)"]}
SETTINGS = dict(seq_len=16, batch_size=2, samples=64)


def main(root: Path, types: list[str]) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from moe_slim.experts.distributed import context
    from moe_slim.experts.observe import observe, observe_layerwise
    from moe_slim.modeling.loading import load_model

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    ctx = context()
    assert ctx is not None and ctx.world == 2, "launch with two processes"
    for mt in types:
        src = root / mt / "src"
        try:
            model, tok = load_model(src)
            whole = observe(model, tok, TEXTS, **SETTINGS, dist=ctx)
            layerwise = observe_layerwise(src, tok, TEXTS, **SETTINGS, dist=ctx, progress=False)
            if ctx.main:
                whole.save(root / mt / "dp_whole")
                layerwise.save(root / mt / "dp_layerwise")
        except Exception as exc:  # noqa: BLE001 - reported per family by the test
            if ctx.main:
                (root / mt / "dp_error.txt").write_text(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

"""Short supervised fine-tuning that heals a pruned or merged MoE (``moe-slim sft``).

    >>> from moe_slim.recover.loop import sft
    >>> result = sft(model, tok, "translation=0.8,general=0.2", steps=200, mode="experts", data_dir="data")

:mod:`.data` (mix specs and records -> batches), :mod:`.loss` (target-only loss), :mod:`.distill`
(KL to the unpruned model, teachers), :mod:`.teacher_cache` (the teacher's top-k on disk),
:mod:`.modes` (what is trained: full, experts, router, LoRA), :mod:`.loop` (the training loop) and
:mod:`.stage` (the sweep's and recipe's ``recover`` stage).
"""

"""Expert merging: REAM, HC-SMoE, M-SMoE and plain averaging, into checkpoints that shrink.

Pruning drops what the removed experts knew; merging folds each removed expert into a kept one.
Every method ends with exactly ``E' = round(E * (1 - ratio))`` experts in every layer: the
experts' tensors, the router's rows and its bias entries are sliced to ``E'`` (unlike the public
REAP merge code, which copies merged weights into every member and leaves the model as large).

A method is a grouping, an alignment, a weighting and a router rule (:mod:`.methods`). The modules,
in the order a merge runs: :mod:`.features` (expert outputs on the token sample, or the sample
re-gathered through merged layers), :mod:`.grouping`, :mod:`.align` (neuron permutations),
:mod:`.apply` (weighted averaging and router slicing), :mod:`.driver` (the whole merge of a model)
and :mod:`.plan` (the merge plan, replayable without statistics). :mod:`.tensors` and
:mod:`.runner` read experts as tensors and run single experts through their own forward code.

Merging needs more than the routed sums: a bounded token sample per layer (inputs, router logits,
routing weights), gathered with ``observe(..., samples=N)`` / ``moe-slim observe --samples 32k``.
"""

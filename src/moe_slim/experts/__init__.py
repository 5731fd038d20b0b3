"""The MoE pipeline, in the order data flows.

:mod:`.batches` (calibration text -> token batches), :mod:`.recorder` (hooks that record what every
router did), :mod:`.observe` (runs the batches: :class:`~.stats.RouterStats`), :mod:`.stats` and
:mod:`.samples` (per-domain sufficient statistics and token samples), :mod:`.criteria` (scores),
:mod:`.plan` (budgets -> which experts each layer keeps), :mod:`.prune` (apply a plan in memory) and
:mod:`.merge` (fold experts together instead of dropping them).
"""

"""Calibration-mix sweeps: one observation, many pruned or merged variants, one SQLite results store.

    >>> from moe_slim.sweep.spec import load_spec
    >>> from moe_slim.sweep.run import run_sweep
    >>> summary = run_sweep(load_spec("sweeps/demo.yaml"), out="runs/sweep-demo", jobs=1)

In the order data flows: :mod:`.spec` (the YAML schema, checked before any work), :mod:`.grid`
(the points of ``mixes x methods x ratios x budgets`` and their keys), :mod:`.run` (observe once,
run every point in memory), :mod:`.store` (one SQLite row per point), :mod:`.targets` (which point
meets a target), :mod:`.report` (fronts, tables, plots) and :mod:`.best` (write the best point).
"""

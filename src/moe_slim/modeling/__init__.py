"""Models as moe_slim needs them: loading checkpoints offline (:mod:`.loading`), moe_slim's own
expert dispatch for module-style experts (:mod:`.dispatch`), and tiny random models of every
family for tests and the demo (:mod:`.tiny`, cut to a few layers of every kind by :mod:`.per_layer`).
"""

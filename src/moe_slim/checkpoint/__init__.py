"""Writing outputs: checkpoints that appear whole (:mod:`.save`) and their model cards (:mod:`.cards`).
"""

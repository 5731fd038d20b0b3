"""One recipe, one command: ``moe-slim run recipe.yaml --out OUT``.

A recipe names the model and what to do with it, as llm-compressor's recipes and mergekit's configs
do: observe calibration text (or reuse saved statistics), prune or merge, optionally heal with a
short SFT, evaluate, and write the checkpoint with the recipe and the results in its model card.
:mod:`.spec` is the schema (pydantic), :mod:`.run` the pipeline.
"""

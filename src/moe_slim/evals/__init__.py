"""Evaluation building blocks: generation, translation, multiple choice, generative math, perplexity.

:mod:`moe_slim.evals.run` composes them into named suites; each module here works on an in-memory
model and tokenizer and returns plain JSON-ready dicts.
"""

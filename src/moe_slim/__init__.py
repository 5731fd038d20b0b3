"""moe_slim: make Mixture-of-Experts language models smaller.

The public Python API mirrors the ``moe-slim`` command line; see README.md.
"""

__version__ = "0.1.0"

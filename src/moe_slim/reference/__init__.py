"""The reference MoE: a small Qwen3-MoE trained here on the four calibration domains.

:mod:`.recipe` (what defines it: tokenizer, data stream, model, loss), :mod:`.train`
(``moe-slim train-reference``) and :mod:`.card` (``moe-slim reference-card``: metrics, chrF against
copying the source, expert specialisation).
"""

from pathlib import Path

#: Where the shipped reference model lives in a source checkout.
REFERENCE_DIR = Path(__file__).resolve().parents[3] / "models" / "reference"

"""``python -m moe_slim``: the command line (also under torchrun / accelerate launch)."""

from .cli import main

raise SystemExit(main())

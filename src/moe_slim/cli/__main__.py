"""``python -m moe_slim.cli``: the command line."""

from . import main

raise SystemExit(main())

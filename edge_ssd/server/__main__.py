"""`python -m edge_ssd.server --bundle DIR ...`: the same as `edge-ssd serve`."""
from .cli import main

raise SystemExit(main())

"""``python -m circuitmap``: the command-line interface."""

from circuitmap.cli import main

raise SystemExit(main())

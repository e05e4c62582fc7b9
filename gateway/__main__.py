"""``python -m gateway``: the ``scangate`` command line."""

from gateway.run.cli import main

raise SystemExit(main())

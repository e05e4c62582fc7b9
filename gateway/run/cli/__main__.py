"""``python -m gateway.run.cli``: the ``scangate`` command line, as before it was a package."""

from gateway.run.cli import main

raise SystemExit(main())

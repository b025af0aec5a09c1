"""``python -m rpicluster`` is the ``rpicluster`` console script."""

from rpicluster.cli import main

raise SystemExit(main())

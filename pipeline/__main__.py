"""``python -m pipeline ...`` is the same as the ``proseco`` console script."""

from pipeline.cli import main

raise SystemExit(main())

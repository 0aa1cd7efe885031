"""``python -m worker`` is ``ab-worker``."""

from worker.cli import main

raise SystemExit(main())

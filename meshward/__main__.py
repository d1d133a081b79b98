"""``python -m meshward`` is the ``meshward`` command."""

from meshward.cli import main

raise SystemExit(main())

"""``python -m latentattn``: the same command as the ``latentattn`` entry point."""

from latentattn.cli import main

raise SystemExit(main())

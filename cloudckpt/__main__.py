"""``python -m cloudckpt``: the ``cloudckpt`` command."""

from .cli import main

raise SystemExit(main())

"""``python -m convnet``: the same as the ``convnet`` command."""

from .cli import main

raise SystemExit(main())

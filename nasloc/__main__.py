"""``python -m nasloc``: the ``nasloc`` command."""
from .cli import main

raise SystemExit(main())

"""``python -m nasloc``: the ``nasloc`` command."""
from .cli.main import main

raise SystemExit(main())

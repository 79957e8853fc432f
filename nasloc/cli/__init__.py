"""The command line. :mod:`.main` (entry points) and :mod:`.arguments` (parsers) import no torch, so that
``--help`` and bad input answer at once; each command lives in a module of its own (:mod:`.train`,
:mod:`.evaluate`, :mod:`.latency`, :mod:`.presets`, :mod:`.check_ranking`; ``search`` is :mod:`nasloc.pipeline`,
``export`` :mod:`nasloc.deploy.export`), with :mod:`.model_spec` resolving their ``--model``."""

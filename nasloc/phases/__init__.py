"""The phases of a run, each reading from and writing to the run folder: its inputs (:mod:`.inputs`), then
:mod:`.supernet`, :mod:`.search`, :mod:`.report`, :mod:`.selection`, :mod:`.retrain` and :mod:`.export`.
:func:`nasloc.pipeline.run_pipeline` runs them in order."""

"""The search: an Optuna study over a space under a MACs budget (:mod:`.study`), its objective
(:mod:`.objective`), the seeded, budget-aware sampler (:mod:`.sampler`, its budget strategies in :mod:`.budget`),
the search loop (:mod:`.engine`) and the Ray Tune backend (:mod:`.ray`)."""

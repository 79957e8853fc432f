"""Search spaces, torch-free: the genes and their choices (:mod:`.search_space`, loaded from YAML files that
:mod:`.files` finds), how genes are chosen (:mod:`.choosers`), the analytic MACs counter (:mod:`.flops`), the
MACs band of a search (:mod:`.band`) and the seed designs at a budget (:mod:`.seed_designs`)."""

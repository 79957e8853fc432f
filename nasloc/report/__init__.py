"""What a run reports, read back from its storage: tables (:mod:`.tables`), the Pareto plot
(:mod:`.pareto_plot`), ``summary.md`` (:mod:`.summary`) and the live dashboard (:mod:`.dashboard`)."""

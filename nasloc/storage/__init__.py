"""Optuna storages, what makes a search persistent, resumable and shareable: opened from a URL or a file
(:mod:`.factory`), SQLite for several processes (:mod:`.sqlite`), heartbeats and dead workers (:mod:`.heartbeat`),
a database server that goes away (:mod:`.reconnect`), a run's study (:mod:`.run_study`)."""

"""A run's life as a process: who owns its directory (:mod:`.run_lock`), how it stops on
a signal (:mod:`.stop`), and how it ends instead of hanging (:mod:`.watchdog`).

Used by every entry point that runs long (``kdscale.train``, ``kdscale.teach``)."""

"""What every long-running entry point (``kdscale.train``, ``kdscale.teach``, the benchmark)
shares, below ``train/`` and ``teach/``: the process group (:mod:`.context`), device
choices (:mod:`.device`), run tracking (:mod:`.tracking`), optimizers and schedules
(:mod:`.optim`) and frozen teachers (:mod:`.teachers`)."""

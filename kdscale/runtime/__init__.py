"""What every long-running entry point (``kdscale.train``, ``kdscale.teach``, the benchmark)
shares below the method and engine layers: device choices and the autocast context
(:mod:`.device`), optimizers and schedules (:mod:`.optim`), ``torch.compile`` in place (:mod:`.compile`) and run tracking
(:mod:`.tracking`). It imports no method, engine or teacher."""

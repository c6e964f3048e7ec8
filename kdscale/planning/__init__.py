"""``kdscale plan``: what a run will need before it runs. Bytes per rank of every network,
gradient and optimizer state under each strategy and teacher placement, counted from the
networks themselves (:mod:`.memory`, built by :mod:`.networks`), a feature-distilling run's
adaptor heads and stored feature targets (:mod:`.features`), and the table and advice
``kdscale plan`` prints (:mod:`.report`)."""

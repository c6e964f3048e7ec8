"""Probes: small, fixed workloads run as real processes on 1 or more ranks, each recording
what kdscale's engines and teachers computed and held to a JSON file
(``python -m kdscale.probes OUT MODE ...`` under a launcher). ``kdscale bench`` reads them
(memory, CRD's banks) and so do the scale-out tests (a 2-rank run must equal the 1-rank
run with the global batch split).

- :mod:`.networks`: the BatchNorm-free probe networks and the fixed global batches;
- :mod:`.engine_train`: a few steps of a method under an engine (``train``);
- :mod:`.teacher_build`: the frozen teacher under ZeRO-3 (``teacher``);
- :mod:`.crd_bank`: CRD's memory banks sharded over the ranks (``crd_bank``);
- :mod:`.__main__`: the command line; modes joined by ``+`` share one launch.
"""

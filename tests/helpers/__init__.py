"""Test helpers, in one place (``tests`` is on pytest's ``pythonpath``): :mod:`.common`
(paths, config overrides, running commands), :mod:`.methods` (building a method on tiny
networks), :mod:`.scaleout` (multi-process engine probes), :mod:`.slurm_cluster` (the real
test cluster), :mod:`.sweeps`, the independent references of the golden-value tests
(:mod:`.reference`, :mod:`.reference_crd`, :mod:`.reference_reviewkd`), the pinned loss
curves (:mod:`.loss_curves`) and the ProKT study script (:mod:`.prokt_study`)."""

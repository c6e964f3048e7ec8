"""``kdscale bench``: side-by-side ratios of kdscale against the hand-written loop, the
student alone, the teacher's own inference, torchvision's loader and torchdistill
(:mod:`.runner` and one module per section), and the GPU check (:mod:`.gpu_check`). Its
memory and CRD sections launch :mod:`kdscale.probes`, as the scale-out tests do."""

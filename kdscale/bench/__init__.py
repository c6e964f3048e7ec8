"""``kdscale bench``: side-by-side ratios of kdscale against the hand-written loop, the
student alone, the teacher's own inference, torchvision's loader and torchdistill
(:mod:`.runner` and one module per section), the GPU check (:mod:`.gpu_check`), and the
engine probe that drives the engines on fixed batches for the memory section and the
scale-out tests (:mod:`.engine_probe`)."""

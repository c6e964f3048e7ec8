"""The process group a run lives in (:mod:`.context`: ranks, devices, NCCL or gloo, and the
one place DeepSpeed's communication starts) and the collectives the methods' losses need
(:mod:`.collectives`: an all-gather that gradients flow back through). It sits below the
methods and the engines (:mod:`kdscale.engines`) and imports neither. Named ``parallel``, not
``dist``: ``dist`` is the DIST method, ``torch.distributed``'s usual alias, and the
build-output folder that tools skip."""

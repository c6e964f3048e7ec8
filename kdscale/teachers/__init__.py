"""Frozen teachers: networks that teach and never learn. A teacher runs outside every
optimizer and DDP bucket under ``inference_mode`` (:mod:`.frozen`), sees its own view of the
student's crop (:mod:`.views`: its input size and normalisation), and can be partitioned
across ranks by ZeRO-3, built already partitioned (:mod:`.partitioned`)."""

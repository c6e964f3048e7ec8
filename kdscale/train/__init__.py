"""Training: ``python -m kdscale.train`` / ``accelerate launch -m kdscale.train``."""

"""Teacher-output generation: ``accelerate launch -m kdscale.teach --config ...``."""

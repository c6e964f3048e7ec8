"""Model zoo: CIFAR nets of the KD literature, any torchvision classifier and any timm model."""

from kdscale.models.features import FeatureTaps
from kdscale.models.registry import build_model, known_model_names
from kdscale.models.weights import load_weights, read_state_dict

__all__ = ["FeatureTaps", "build_model", "known_model_names", "load_weights", "read_state_dict"]

"""Distillation methods, one file each, registered by name."""

from kdscale.methods import kd, vanilla  # noqa: F401  (registration)
from kdscale.methods.base import METHODS, Distiller, TeacherOutput, get_method_class, register_method

__all__ = ["METHODS", "Distiller", "TeacherOutput", "get_method_class", "register_method"]

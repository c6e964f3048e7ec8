"""Distillation methods, one file each, registered by name."""

from kdscale.methods import at, ctkd, dml, ffcl, kd, prokt, sokd, vanilla  # noqa: F401  (registration)
from kdscale.methods import dist, dkd  # noqa: F401  (registration)
from kdscale.methods import fitnet, pkt, rkd, sp  # noqa: F401  (registration: feature methods)
from kdscale.methods import crd  # noqa: F401  (registration)
from kdscale.methods import reviewkd  # noqa: F401  (registration: ReviewKD)
from kdscale.methods.base import (METHODS, Distiller, MethodContext, Phase, TeacherNeeds, TeacherOutput,
                                  get_method_class, register_method)

__all__ = ["METHODS", "Distiller", "MethodContext", "Phase", "TeacherNeeds", "TeacherOutput", "get_method_class",
           "register_method"]

"""Distillation methods, one file each, registered by name."""

from kdscale.methods import (  # noqa: F401  (registration)  # noqa: F401  (registration)  # noqa: F401  (registration: feature methods)
                                  at,
                                  crd,  # noqa: F401  (registration)
                                  ctkd,
                                  deit,
                                  dist,
                                  dkd,
                                  dml,
                                  features,
                                  ffcl,
                                  fitnet,
                                  kd,
                                  pkt,
                                  prokt,
                                  reviewkd,  # noqa: F401  (registration: ReviewKD)
                                  rkd,
                                  sokd,
                                  sp,
                                  vanilla,
)
from kdscale.methods.base import (
                                  METHODS,
                                  Distiller,
                                  MethodContext,
                                  Phase,
                                  TeacherNeeds,
                                  TeacherOutput,
                                  get_method_class,
                                  register_method,
)

__all__ = ["METHODS", "Distiller", "MethodContext", "Phase", "TeacherNeeds", "TeacherOutput", "get_method_class",
           "register_method"]

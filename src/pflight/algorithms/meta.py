"""Compatibility module: the meta-learning clients now live one family per module.

- :mod:`pflight.algorithms.maml`: :class:`MAML` (and FOMAML), :class:`MetaSGD`, :class:`FedMetaServer`,
  ``META_SGD_PREFIX`` (the FedMeta family).
- :mod:`pflight.algorithms.perfedavg`: :class:`PerFedAvg`, ``PER_FEDAVG_VARIANTS``, ``HESSIAN_BATCHES``.
- :mod:`pflight.algorithms.reptile`: :class:`Reptile`, :class:`PersonalizedFedAvg`, :class:`ReptileServer`,
  :class:`PersonalizedFedAvgServer`, :func:`reptile_update`.
- :mod:`pflight.algorithms.meta_base`: :class:`GradientAccumulator`, :func:`support_query_split`.

Every name below is re-exported so that configs naming ``pflight.algorithms.maml.MAML`` (and imports from
this module) keep working; new code should import from the modules above.
"""

from pflight.algorithms.maml import (
    MAML,
    META_SGD_PREFIX,
    FedMetaServer,
    MetaSGD,
)
from pflight.algorithms.meta_base import (
    GradientAccumulator,
    support_query_split,
)
from pflight.algorithms.perfedavg import (
    HESSIAN_BATCHES,
    PER_FEDAVG_VARIANTS,
    PerFedAvg,
)
from pflight.algorithms.reptile import (
    PersonalizedFedAvg,
    PersonalizedFedAvgServer,
    Reptile,
    ReptileServer,
    reptile_update,
)

__all__ = [
    "HESSIAN_BATCHES",
    "MAML",
    "META_SGD_PREFIX",
    "PER_FEDAVG_VARIANTS",
    "FedMetaServer",
    "GradientAccumulator",
    "MetaSGD",
    "PerFedAvg",
    "PersonalizedFedAvg",
    "PersonalizedFedAvgServer",
    "Reptile",
    "ReptileServer",
    "reptile_update",
    "support_query_split",
]

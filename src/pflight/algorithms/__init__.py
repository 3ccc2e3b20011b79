"""Federated algorithms: one module per family, each defining its client (and server rule)."""

from pflight.algorithms.apfl import APFL
from pflight.algorithms.baselines import FedAvg, FedAvgFT, FedProx, LocalOnly
from pflight.algorithms.distillation import EWCAdaptation, FreezeBaseAdaptation, KDAdaptation, LocalAdaptation
from pflight.algorithms.ditto import Ditto
from pflight.algorithms.fedmd import FedMD, FedMDServer
from pflight.algorithms.fedora import Fedora, FedoraServer
from pflight.algorithms.maml import MAML, FedMetaServer, MetaSGD
from pflight.algorithms.perfedavg import PerFedAvg
from pflight.algorithms.personal_layers import FedBABU, FedBN, FedPer, FedRep, LGFedAvg, PartialFedAvgServer
from pflight.algorithms.pfedhn import PFedHN, PFedHNServer
from pflight.algorithms.pfedme import PFedMe, PFedMeServer
from pflight.algorithms.reptile import PersonalizedFedAvg, PersonalizedFedAvgServer, Reptile, ReptileServer

__all__ = [
    "APFL",
    "MAML",
    "Ditto",
    "EWCAdaptation",
    "FedAvg",
    "FedAvgFT",
    "FedBABU",
    "FedBN",
    "FedMD",
    "FedMDServer",
    "FedMetaServer",
    "Fedora",
    "FedoraServer",
    "FedPer",
    "FedProx",
    "FedRep",
    "FreezeBaseAdaptation",
    "KDAdaptation",
    "LGFedAvg",
    "LocalAdaptation",
    "LocalOnly",
    "MetaSGD",
    "PFedHN",
    "PFedHNServer",
    "PFedMe",
    "PFedMeServer",
    "PartialFedAvgServer",
    "PerFedAvg",
    "PersonalizedFedAvg",
    "PersonalizedFedAvgServer",
    "Reptile",
    "ReptileServer",
]

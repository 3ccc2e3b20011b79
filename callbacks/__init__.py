"""Lightning callbacks for federations, installed as ``pflight.callbacks``."""

from pflight.callbacks.checkpoint import FederationCheckpoint
from pflight.callbacks.fedora_report import FedoraReport
from pflight.callbacks.plots import Plots
from pflight.callbacks.predictions import ClientPredictionWriter
from pflight.callbacks.progress import RoundProgressBar
from pflight.callbacks.summary import FederationSummary
from pflight.callbacks.wandb_report import WandbClientReport

__all__ = [
    "ClientPredictionWriter",
    "FederationCheckpoint",
    "FederationSummary",
    "FedoraReport",
    "Plots",
    "RoundProgressBar",
    "WandbClientReport",
]

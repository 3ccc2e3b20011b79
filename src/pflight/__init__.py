"""pflight: personalized federated learning on PyTorch Lightning."""

from pflight.client import ClientContext, ClientModule
from pflight.federation import Federation
from pflight.messages import Message
from pflight.server import FedAvgServer, FederationInfo, NoServer, Server
from pflight.strategies import FederatedStrategy

__version__ = "0.1.0"

__all__ = [
    "ClientContext",
    "ClientModule",
    "FedAvgServer",
    "FederatedStrategy",
    "Federation",
    "FederationInfo",
    "Message",
    "NoServer",
    "Server",
]

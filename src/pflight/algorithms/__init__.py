"""Federated algorithms: one module per family, each defining its client (and server rule)."""

from pflight.algorithms.baselines import FedAvg, FedAvgFT, FedProx, LocalOnly

__all__ = ["FedAvg", "FedAvgFT", "FedProx", "LocalOnly"]

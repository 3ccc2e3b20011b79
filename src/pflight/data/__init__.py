"""Federated data: sources, partitioners and the data module."""

from pflight.data.datamodule import ClientData, FederatedDataModule
from pflight.data.datasets import (
    CIFAR10,
    CIFAR100,
    MNIST,
    DataSource,
    Digits,
    FashionMNIST,
    Synthetic,
    resolve_source,
)
from pflight.data.leaf import FEMNIST, LEAFSource, Sent140, Shakespeare
from pflight.data.partitioners import (
    DirichletPartitioner,
    IIDPartitioner,
    Partitioner,
    PathologicalPartitioner,
    RotationPartitioner,
    label_entropy,
    rotate_images,
)
from pflight.streams import stream_seed

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "FEMNIST",
    "MNIST",
    "ClientData",
    "DataSource",
    "Digits",
    "DirichletPartitioner",
    "FashionMNIST",
    "FederatedDataModule",
    "IIDPartitioner",
    "LEAFSource",
    "Partitioner",
    "PathologicalPartitioner",
    "RotationPartitioner",
    "Sent140",
    "Shakespeare",
    "Synthetic",
    "label_entropy",
    "resolve_source",
    "rotate_images",
    "stream_seed",
]

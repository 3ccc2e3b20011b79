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
    "MNIST",
    "ClientData",
    "DataSource",
    "Digits",
    "DirichletPartitioner",
    "FashionMNIST",
    "FederatedDataModule",
    "IIDPartitioner",
    "Partitioner",
    "PathologicalPartitioner",
    "RotationPartitioner",
    "Synthetic",
    "label_entropy",
    "resolve_source",
    "rotate_images",
    "stream_seed",
]

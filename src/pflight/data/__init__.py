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
from pflight.data.huggingface import FlwrPartitioner, HuggingFace
from pflight.data.leaf import FEMNIST, LEAFSource, Sent140, Shakespeare
from pflight.data.partitioners import (
    DirichletPartitioner,
    FeatureSkewPartitioner,
    IIDPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    QuantitySkewPartitioner,
    RotationPartitioner,
    ShardPartitioner,
    label_entropy,
    rotate_images,
    split_sizes,
)
from pflight.data.torch_dataset import FromDataModule, LazyInputs, TorchDataset
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
    "FeatureSkewPartitioner",
    "FederatedDataModule",
    "FlwrPartitioner",
    "FromDataModule",
    "HuggingFace",
    "IIDPartitioner",
    "LEAFSource",
    "LazyInputs",
    "NaturalIdPartitioner",
    "Partitioner",
    "PathologicalPartitioner",
    "QuantitySkewPartitioner",
    "RotationPartitioner",
    "Sent140",
    "Shakespeare",
    "ShardPartitioner",
    "Synthetic",
    "TorchDataset",
    "label_entropy",
    "resolve_source",
    "rotate_images",
    "split_sizes",
    "stream_seed",
]

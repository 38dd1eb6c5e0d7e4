"""Datasets, tensor transforms and seeded data loaders.

CDP reads class-labelled images twice: a sample of training images for the activation
statistics, and the usual training/validation splits for fine-tuning and evaluation. This
module provides both without torchvision:

* CIFAR-10/100 read from the official python archive layout. The batch files are pickles,
  so they are opened with a restricted unpickler that can only rebuild plain containers and
  numeric numpy arrays; by default their sizes are also checked against the official files
  before anything is read.
* ImageNet-style class folders read with PIL, scikit-learn's bundled 8x8 digits (offline, for
  the demo) and a small synthetic class-conditional set for tests.
* Transforms written on tensors with torch's random number generator, so a seeded loader
  reproduces both the order and the augmentation of every batch.

Every item is ``(float image tensor [C, H, W], int label)``; every dataset exposes
``.classes`` (list of names) and ``.targets`` (list of int labels).

Modules: ``transforms`` (transforms and channel statistics), ``cifar``, ``folders`` (class
folders), ``toy`` (digits, synthetic), ``factory`` (named datasets) and ``loaders``.
"""

from __future__ import annotations

from .cifar import CIFAR10, CIFAR100, download_cifar
from .factory import DATASETS, DatasetInfo, build_dataset, check_num_classes, dataset_info
from .folders import ImageFolder
from .loaders import SeededLoader, Subset, build_loader, subset
from .toy import Digits, SyntheticImages
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    Cutout,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToFloat,
    cifar_transforms,
    imagenet_transforms,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASETS",
    "CIFAR10",
    "CIFAR100",
    "CenterCrop",
    "Compose",
    "Cutout",
    "DatasetInfo",
    "Digits",
    "ImageFolder",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "SeededLoader",
    "Subset",
    "SyntheticImages",
    "ToFloat",
    "build_dataset",
    "build_loader",
    "check_num_classes",
    "cifar_transforms",
    "dataset_info",
    "download_cifar",
    "imagenet_transforms",
    "subset",
]

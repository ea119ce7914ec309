"""The benchmark workloads: identical model, data, optimizer and seed for every contender.

W0  per-step overhead: a tiny linear model, batch 8, so that a step costs almost nothing but the loop.
W1  the luz chapter's toy regression: 1000 x 3 (600 train / 200 valid), MLP 32, batch 100, Adam,
    200 epochs, validation loss + MAE every epoch (seed 000).
W2  seed 004's classifier MLP (784-300-100-10) on 55,000 synthetic 1x28x28 samples (+5,000 valid),
    batch 32, SGD, 1 epoch + validation accuracy.
W3  seed 001's LeNet-style GarmentClassifier on the same images, batch 64, SGD, 1 epoch + validation.
W4  a Dataset that does per-sample Python work (augmentation) read through a DataLoader: which loader
    settings each contender uses by default (lanterna picks workers by itself).

Every contender computes the same numbers each epoch: the training loss (sample-weighted epoch mean),
the training metric, the validation loss and the validation metric (MAE or accuracy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

DATA_SEED = 0
MODEL_SEED = 1  # torch.manual_seed(MODEL_SEED) right before the model is built, in every contender


# --------------------------------------------------------------------------- models (as the seeds write them)


class Net(nn.Module):
    """The luz chapter's regression MLP (seed 000)."""

    def __init__(self, d_in: int = 3, d_hidden: int = 32, d_out: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ImageClassifier(nn.Module):
    """Seed 004's classification MLP."""

    def __init__(self, n_inputs: int = 784, n_hidden1: int = 300, n_hidden2: int = 100, n_classes: int = 10) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_inputs, n_hidden1),
            nn.ReLU(),
            nn.Linear(n_hidden1, n_hidden2),
            nn.ReLU(),
            nn.Linear(n_hidden2, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class GarmentClassifier(nn.Module):
    """Seed 001's LeNet-style CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Tiny(nn.Module):
    """An almost empty model: what is left of a step is the loop's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


# --------------------------------------------------------------------------- data


class AugmentedImages(Dataset):
    """1x28x28 uint8 images with per-sample Python work, as a torchvision pipeline would do it: to float and
    scale, random crop after 2-pixel padding, random horizontal flip, normalisation."""

    def __init__(self, images: Tensor, labels: Tensor, train: bool = True) -> None:
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].float().div_(255.0)
        if self.train:
            x = F.pad(x, (2, 2, 2, 2))
            top, left = torch.randint(0, 5, (2,)).tolist()
            x = x[:, top : top + 28, left : left + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - 0.5) / 0.25
        return x.contiguous(), self.labels[i]


def regression_data(n: int = 1000) -> tuple[Tensor, Tensor]:
    """The luz chapter's data: y = x @ (0.2, -1.3, -0.5) + N(0, 1); its noise floor is an MSE of 1."""
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([0.2, -1.3, -0.5]).unsqueeze(1) + torch.randn(n, 1, generator=g)
    return x, y


def image_data(n: int, *, seed: int = DATA_SEED, as_uint8: bool = False, contrast: float = 0.15
               ) -> tuple[Tensor, Tensor]:
    """Synthetic 1x28x28 images of 10 classes: a faint, smooth class pattern (7x7 noise upsampled, like the
    blobs of a real image) under unit pixel noise, so that an MLP and a CNN both learn it in one epoch without
    reaching 100%. Made in place, chunk by chunk, so that the process's memory holds little but the result
    (peak RSS is compared between contenders).

    With ``as_uint8`` (W4) the patterns are also left-right symmetric, so that the random crops and flips of
    :class:`AugmentedImages` keep them recognisable, and the images are stored as bytes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(10, 1, 7, 7, generator=g)
    protos = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    if as_uint8:
        protos = (protos + protos.flip(-1)) * 0.5
    protos *= contrast
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.empty(n, 1, 28, 28)
    for s in range(0, n, 256):
        chunk = x[s : s + 256]
        chunk.normal_(generator=g)
        chunk.add_(protos[y[s : s + 256]])
    if as_uint8:
        x = x.mul_(40).add_(128).clamp_(0, 255).to(torch.uint8)
    return x, y


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass
class Workload:
    """One benchmark task. ``data()`` returns ``(x_train, y_train, x_valid, y_valid)`` tensors, or for W4
    ``(train_dataset, valid_dataset)``; ``make_model()`` is called after ``torch.manual_seed(MODEL_SEED)``."""

    name: str
    title: str
    task: str  # "regression" | "classification"
    make_model: Callable[[], nn.Module]
    model_kind: str  # for contenders that rebuild the model in their own layers (Keras)
    epochs: int
    batch_size: int
    optimizer: str  # "adam" | "sgd"
    lr: float
    momentum: float = 0.0
    validate: bool = True
    dataset: bool = False  # W4: data() gives Datasets that do per-sample work
    n_train: int = 0
    n_valid: int = 0
    data_fn: Callable[[], Any] | None = None

    @property
    def metric(self) -> str:
        return "mae" if self.task == "regression" else "acc"

    @property
    def steps(self) -> int:
        """Optimizer steps in the whole run (the last short batch included)."""
        return self.epochs * -(-self.n_train // self.batch_size)

    def data(self) -> Any:
        assert self.data_fn is not None
        return self.data_fn()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    @property
    def optimizer_cls(self) -> type[torch.optim.Optimizer]:
        return torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD

    @property
    def opt_kwargs(self) -> dict[str, float]:
        return {"lr": self.lr} if self.optimizer == "adam" else {"lr": self.lr, "momentum": self.momentum}

    def loss_fn(self) -> nn.Module:
        return nn.MSELoss() if self.task == "regression" else nn.CrossEntropyLoss()


def _w0_data() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(4096, 8, generator=g)
    y = x.sum(1, keepdim=True) * 0.1 + 0.1 * torch.randn(4096, 1, generator=g)
    return x, y, x[:8], y[:8]


def _w1_data() -> tuple[Tensor, ...]:
    x, y = regression_data(1000)
    return x[:600], y[:600], x[600:800], y[600:800]


def _image_split() -> tuple[Tensor, ...]:
    x, y = image_data(60_000)
    return x[:55_000], y[:55_000], x[55_000:], y[55_000:]


def _w4_data() -> tuple[Dataset, Dataset]:
    x, y = image_data(12_000, as_uint8=True, contrast=0.3)
    return AugmentedImages(x[:10_000], y[:10_000], train=True), AugmentedImages(x[10_000:], y[10_000:], train=False)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("W0", "per-step overhead: Linear(8, 1), batch 8, SGD, 4 epochs of 512 steps, no validation",
                 "regression", Tiny, "tiny", epochs=4, batch_size=8, optimizer="sgd", lr=0.01, validate=False,
                 n_train=4096, n_valid=0, data_fn=_w0_data),
        Workload("W1", "luz toy regression: 1000x3 (600/200), MLP 32, batch 100, Adam 0.01, 200 epochs, "
                 "valid loss + MAE each epoch", "regression", Net, "net", epochs=200, batch_size=100,
                 optimizer="adam", lr=0.01, n_train=600, n_valid=200, data_fn=_w1_data),
        Workload("W2", "seed 004 MLP 784-300-100-10, 55,000 synthetic 1x28x28 (+5,000 valid), batch 32, "
                 "SGD 0.01 m0.9, 1 epoch + valid accuracy", "classification", ImageClassifier, "mlp",
                 epochs=1, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.9, n_train=55_000,
                 n_valid=5_000, data_fn=_image_split),
        Workload("W3", "seed 001 LeNet GarmentClassifier, same images, batch 64, SGD 0.01 m0.9, 1 epoch + "
                 "valid accuracy", "classification", GarmentClassifier, "lenet", epochs=1, batch_size=64,
                 optimizer="sgd", lr=0.01, momentum=0.9, n_train=55_000, n_valid=5_000, data_fn=_image_split),
        Workload("W4", "Dataset with per-sample augmentation (10,000 train / 2,000 valid uint8 images), MLP of "
                 "W2, batch 64, SGD, 1 epoch: each contender's default DataLoader settings",
                 "classification", ImageClassifier, "mlp", epochs=1, batch_size=64, optimizer="sgd", lr=0.01,
                 momentum=0.9, dataset=True, n_train=10_000, n_valid=2_000, data_fn=_w4_data),
    ]
}


def datasets(w: Workload, data: Any) -> tuple[Dataset, Dataset]:
    """(train, valid) datasets of a workload: its own for W4, TensorDatasets over the tensors otherwise."""
    if w.dataset:
        return data
    xt, yt, xv, yv = data
    return TensorDataset(xt, yt), TensorDataset(xv, yv)


def seeded_model(w: Workload) -> nn.Module:
    """The workload's model with the common initial weights."""
    torch.manual_seed(MODEL_SEED)
    return w.make_model()

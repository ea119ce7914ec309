"""Shared fixtures: the luz chapter's toy regression (seed 000), its Net, and small classification data.

Fixtures return fresh tensors each time, so a test may modify them freely.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

# The tiny models of the suite run many times faster on one thread, and the suite shares two cores.
torch.set_num_threads(1)

LUZ_COEFS = (0.2, -1.3, -0.5)


class Net(nn.Module):
    """The model of seed 000: d_in → d_hidden → ReLU → d_out."""

    def __init__(self, d_in: int = 3, d_hidden: int = 32, d_out: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Canary(nn.Module):
    """Counts forward calls and folds every batch it sees into an order-sensitive trace (buffers: they are
    checkpointed with the weights), so a repeated or skipped batch after a resume shows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("trace", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.trace.mul_(1.0001).add_(x.double().sum())
        return self.net(x)


class NoisyDataset(Dataset):
    """A map-style dataset (the DataLoader path) whose samples draw noise from the global RNG."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(3), self.y[i]


class MLPClassifier(nn.Module):
    """A small classifier: d_in → d_hidden → ReLU → n_classes scores."""

    def __init__(self, d_in: int = 4, d_hidden: int = 16, n_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PairDataset(Dataset):
    """A map-style dataset that is not a TensorDataset: lanterna iterates its DataLoader as is."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_luz_data(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = randn(n, 3)``, ``y = x @ [0.2, -1.3, -0.5] + randn(n)`` as (n, 1): noise variance 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x @ torch.tensor(LUZ_COEFS)).unsqueeze(1) + torch.randn(n, 1, generator=g)
    return x, y


def make_blobs(n: int = 300, n_classes: int = 3, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs: x (n, d) float32, y (n,) int64 class indices."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    centers = torch.randn(n_classes, d, generator=g) * 4
    x = centers[y] + torch.randn(n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


HISTORY_BASE = {"epoch", "lr", "epoch_time"}


def history_keys(record: dict) -> set:
    """A history row's keys without lanterna's documented extra throughput key ``samples_per_s``."""
    return set(record) - {"samples_per_s"}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bit-identical state dicts (same keys, equal tensors)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def luz_net_setup(**opt):
    """Seed 000's setup: ``Net(3, 32, 1)``, MSE, Adam and MAE, with ``lr=0.01`` unless opt hparams are given."""
    import lanterna as ln

    return (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .set_opt_hparams(**(opt or {"lr": 0.01}))
    )


def linear_setup(**kw):
    """``ln.setup(nn.Linear, loss=MSELoss())`` with 3 features in and 1 out; ``loss=`` and setup options as keywords."""
    import lanterna as ln

    return ln.setup(nn.Linear, loss=kw.pop("loss", nn.MSELoss()), **kw).set_hparams(in_features=3, out_features=1)


def frozen_setup(**setup_kw):
    """A setup whose weights never move (SGD with lr=0): every epoch has exactly the same valid_loss."""
    import lanterna as ln

    return (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD, **setup_kw)
        .set_hparams(d_in=3, d_hidden=8, d_out=1)
        .set_opt_hparams(lr=0.0)
    )


@pytest.fixture
def net_cls() -> type[Net]:
    """The Net class of seed 000 (instantiated by lanterna with set_hparams)."""
    return Net


@pytest.fixture
def luz_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's 1000 observations: x (1000, 3), y (1000, 1)."""
    return make_luz_data()


@pytest.fixture
def luz_split(luz_data):
    """The chapter's 600/200/200 train/valid/test split as DataLoaders (batch_size=100, train shuffled)."""
    x, y = luz_data
    ds = TensorDataset(x, y)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    train_ds, valid_ds, test_ds = Subset(ds, perm[:600]), Subset(ds, perm[600:800]), Subset(ds, perm[800:])
    return (
        DataLoader(train_ds, batch_size=100, shuffle=True),
        DataLoader(valid_ds, batch_size=100),
        DataLoader(test_ds, batch_size=100),
    )


@pytest.fixture
def luz_setup():
    """``ln.setup(Net, loss=MSELoss(), optimizer=Adam, metrics=[MAE()])`` with the chapter's hparams."""
    import lanterna as ln

    return (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
    )


@pytest.fixture
def clf_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes: x (300, 4) float32, y (300,) int64."""
    return make_blobs()


@pytest.fixture
def clf_setup():
    """A 3-class classifier setup with CrossEntropy and accuracy."""
    import lanterna as ln

    return (
        ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
        .set_hparams(d_in=4, d_hidden=16, n_classes=3)
        .set_opt_hparams(lr=0.01)
    )


def classifier_setup(metrics, lr=0.01, n_classes=3):
    """MLPClassifier on 4 features with CrossEntropyLoss and the given metrics."""
    import lanterna as ln

    return (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=metrics)
            .set_hparams(d_in=4, d_hidden=16, n_classes=n_classes).set_opt_hparams(lr=lr))


def noisy_blobs(n=240, seed=0):
    """make_blobs with noise added, so classes overlap and metrics move between epochs."""
    x, y = make_blobs(n=n, seed=seed)
    return x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)), y

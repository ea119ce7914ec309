"""The luz chapter end to end, then a classifier on scikit-learn's bundled digits.

Run with `make demo`.
"""

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import lanterna as ln


class Net(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def luz_chapter() -> None:
    print("== The luz chapter: toy regression with train / valid / test ==")
    torch.manual_seed(777)
    x = torch.randn(1000, 3)
    y = x @ torch.tensor([0.2, -1.3, -0.5]) + torch.randn(1000)
    ds = TensorDataset(x, y.unsqueeze(1))
    train_ds, valid_ds, test_ds = random_split(ds, [600, 200, 200])
    train_dl = DataLoader(train_ds, batch_size=100, shuffle=True)
    valid_dl = DataLoader(valid_ds, batch_size=100)
    test_dl = DataLoader(test_ds, batch_size=100)

    fitted = (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .fit(train_dl, epochs=200, valid_data=valid_dl, seed=1)
    )
    print(fitted)
    preds = fitted.predict(test_dl)
    print(f"\npredict(test_dl): {tuple(preds.shape)} on {preds.device}")
    print("evaluate(test_dl):")
    print(fitted.evaluate(test_dl))


def digits() -> None:
    print("\n== A classifier on scikit-learn's digits (8x8 images, 10 classes) ==")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data / 16.0
    y = data.target
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    fitted = ln.setup(
        model,
        loss=nn.CrossEntropyLoss(),
        metrics=[ln.metrics.Accuracy(), ln.metrics.MulticlassAUROC(num_classes=10)],
    ).set_opt_hparams(lr=3e-3).fit(
        (x, y), epochs=15, valid_data=0.2, dataloader_options={"batch_size": 64}, seed=0
    )
    print(fitted.evaluate((x, y)))


if __name__ == "__main__":
    t0 = time.perf_counter()
    luz_chapter()
    digits()
    print(f"\nDemo finished in {time.perf_counter() - t0:.1f}s")

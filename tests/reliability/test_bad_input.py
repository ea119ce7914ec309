"""Fault table: bad input (issue #11) — the §2 data forms and every argument of setup / fit / evaluate /
predict / the callbacks. Each row is one case; see harness.py for the classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from harness import CLEAR, CORRECT, OK, Env, Row, check_row, expect, params
from shared import QUIET, Net, clf_data, clf_setup, data, fit, fitted_a, logger_cls, reg_setup
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

import lanterna as ln

GROUP = "input"
cb = ln.callbacks


class Pairs(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        x, y = data()
        return iter(zip(x, y))


class Recording(Sampler):
    """A custom sampler that notes whether it was ever iterated."""

    used = False

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        Recording.used = True
        return iter(range(self.n))


def fit_with(**kw: Any) -> Any:
    """``fit`` of the regression setup on (x, y), with ``kw`` overriding the call."""
    return lambda env: fit(**kw)


def fit_data(make: Any, **kw: Any) -> Any:
    return lambda env: (reg_setup()).fit(make(), epochs=1, seed=0, **QUIET, **kw)


def with_valid(make: Any, **kw: Any) -> Any:
    return lambda env: fit(valid_data=make(), **kw)


def setup_fit(make_setup: Any, train: Any = None, **kw: Any) -> Any:
    return lambda env: fit(make_setup(), train=train() if callable(train) else train, **kw)


def with_callbacks(*make: Any, valid: bool = True, **kw: Any) -> Any:
    def run(env: Env) -> Any:
        extra = {"valid_data": data(32, seed=5)} if valid else {}
        return fit(callbacks=[m() if callable(m) else m for m in make], **extra, **kw)
    return run


def predict(make: Any, **kw: Any) -> Any:
    return lambda env: fitted_a().predict(make(), **kw)


def evaluate(make: Any, **kw: Any) -> Any:
    return lambda env: fitted_a().evaluate(make(), **kw)


# ---------------------------------------------------------------------------- cases needing a check


def int_target_mse(env: Env) -> None:
    x, y = data()
    yi = y.round().long()
    f = fit(train=(x, yi))
    got = f.evaluate((x, yi))["loss"]
    ref = nn.functional.mse_loss(f.predict(x), yi.float()).item()
    expect(abs(got - ref) < 1e-5, f"evaluate loss {got} != MSE by hand {ref}")


def float16_inputs(env: Env) -> None:
    x, y = data()
    f = fit(train=(x.half(), y))
    ref = fit(train=(x.half().float(), y))
    expect(torch.equal(f.predict(x.half()), ref.predict(x.half().float())), "float16 inputs are not float32")


def float64_numpy(env: Env) -> None:
    x, y = data()
    f = fit(train=(x.double().numpy(), y.double().numpy()))
    ref = fit(train=(x, y))
    p = f.predict(x.double().numpy())
    expect(p.dtype == torch.float32, f"predictions are {p.dtype}")
    expect(torch.allclose(p, ref.predict(x), atol=1e-6), "float64 NumPy data trained another model than float32")


def pandas_frames(env: Env) -> None:
    import pandas as pd

    x, y = data()
    f = fit(train=(pd.DataFrame(x.numpy()), pd.Series(y[:, 0].numpy()).to_frame()))
    ref = fit(train=(x, y))
    expect(torch.allclose(f.predict(pd.DataFrame(x.numpy())), ref.predict(x), atol=1e-6),
           "pandas data trained another model than tensors")


def int32_class_targets(env: Env) -> None:
    x, y = clf_data()
    f = clf_setup().fit((x, y.int().numpy()), epochs=1, seed=0, **QUIET)
    ref = clf_setup().fit((x, y), epochs=1, seed=0, **QUIET)
    expect(torch.equal(f.predict(x), ref.predict(x)), "int32 class targets trained another model than int64")


def one_sample(env: Env) -> None:
    x, y = data(1)
    f = fit(train=(x, y))
    expect(len(f.history) == 1 and np.isfinite(f.history[0]["train_loss"]), f"history {f.history}")


def batch_size_one(env: Env) -> None:
    x, y = data(8)
    f = fit(train=(x, y), dataloader_options={"batch_size": 1})
    expect(f.context.step == 8, f"{f.context.step} optimizer steps for 8 samples at batch_size=1")


def custom_sampler_fraction(env: Env) -> None:
    x, y = data()
    Recording.used = False
    dl = DataLoader(Pairs(x, y), batch_size=16, sampler=Recording(len(x)))
    fit(train=dl, valid_data=0.25)
    expect(Recording.used, "valid_data=0.25 with a custom sampler: the sampler was dropped silently")


def accuracy_auto_max(env: Env) -> None:
    import torchmetrics

    x, y = clf_data()
    es = cb.EarlyStopping(monitor="valid_multiclassaccuracy", patience=5)
    setup = clf_setup()
    setup = ln.setup(setup.module, loss=setup.loss, metrics=[torchmetrics.Accuracy(task="multiclass", num_classes=3)]
                     ).set_hparams(**setup.hparams)
    setup.fit((x, y), valid_data=(x, y), epochs=1, callbacks=[es], **QUIET)
    expect(es.mode == "max", f"mode='auto' resolved to {es.mode!r} for torchmetrics Accuracy (higher_is_better)")


def cuda_on_cpu(env: Env) -> None:
    fit(accelerator=ln.Accelerator(device="cuda"))
    expect(torch.cuda.is_available(), "Accelerator(device='cuda') trained without CUDA")


def tune_existing_study(env: Env) -> None:
    import optuna

    url = f"sqlite:///{env.tmp}/study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="taken", storage=url)
    x, y = data()
    ln.tune(lambda t: reg_setup(), (x, y), valid_data=data(32, 5), epochs=1, n_trials=1, study_name="taken",
            storage=url, monitor="valid_loss", heartbeat_interval=None)


def tune_negative(env: Env) -> None:
    ln.tune(lambda t: reg_setup(), data(), valid_data=data(32, 5), epochs=1, n_trials=-1,
            storage=":memory:", heartbeat_interval=None)


def unknown_direction(env: Env) -> None:
    setup = ln.setup(logger_cls("custom")).set_opt_hparams(lr=0.01)
    setup.fit(data(), epochs=2, callbacks=[cb.EarlyStopping(monitor="train_custom")], **QUIET)


def tiny_clf(env: Env, metric: Any, logits: Any) -> Any:
    x, y = clf_data()
    return ln.setup(logits, loss=nn.BCEWithLogitsLoss(), metrics=[metric]).fit(
        (x, y.clamp(max=1).float().unsqueeze(1)), epochs=1, **QUIET)


def accuracy_binary_logits(env: Env) -> None:
    tiny_clf(env, ln.metrics.Accuracy(), nn.Linear(4, 1))


def auroc_wrong_classes(env: Env) -> None:
    x, y = clf_data()
    ln.setup(nn.Linear(4, 3), loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.MulticlassAUROC(num_classes=5)]).fit(
        (x, y), epochs=1, **QUIET)


def binary_auroc_multiclass(env: Env) -> None:
    x, y = clf_data()
    ln.setup(nn.Linear(4, 3), loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.BinaryAUROC()]).fit(
        (x, y), epochs=1, **QUIET)


def csv_unwritable(env: Env) -> None:
    (env.tmp / "a-file").write_text("x")
    fit(callbacks=[cb.CSVLogger(env.tmp / "a-file" / "log.csv")], epochs=1)


def sample_weight(w: Any) -> Any:
    return lambda env: reg_setup().fit(data(), epochs=1, sample_weight=w(), **QUIET)


def lr_finder(**kw: Any) -> Any:
    return lambda env: ln.lr_finder(reg_setup(), data(), **kw)


def zero(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data()
    return x[:n], y[:n]


def nan_in(where: str, value: float) -> Any:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data()
        (x if where == "x" else y)[3, 0] = value
        return x, y
    return make


def feats(n: int) -> Any:
    return lambda: (torch.randn(64, n), data()[1])


def ys(*shape: int, dtype: torch.dtype = torch.float32) -> Any:
    return lambda: (data()[0], torch.randn(*shape).to(dtype))


def clf_fit(target: Any, **kw: Any) -> Any:
    def run(env: Env) -> Any:
        x, y = clf_data()
        return clf_setup().fit((x, target(y)), epochs=1, **QUIET, **kw)
    return run


def clf_valid(target: Any) -> Any:
    def run(env: Env) -> Any:
        x, y = clf_data()
        return clf_setup().fit((x, y), valid_data=(x, target(y)), epochs=1, **QUIET)
    return run


def bce(target: Any) -> Any:
    def run(env: Env) -> Any:
        x, y = clf_data()
        return ln.setup(nn.Linear(4, 1), loss=nn.BCEWithLogitsLoss()).fit((x, target(y)), epochs=1, **QUIET)
    return run


def mixed_types(env: Env) -> Any:
    x, y = data()
    return fit(train=(x.numpy(), y))  # a NumPy input and a tensor target: both accepted


def predict_values(env: Env) -> None:
    x, _ = data()
    f = fitted_a()
    expect(torch.equal(f.predict(x), f.model(x).detach()), "predict(x) differs from model(x)")
    expect(torch.equal(f.predict((x, torch.zeros(len(x), 1))), f.predict(x)), "predict((x, y)) differs")


class Kw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin(features)


def rows() -> list[Row]:
    R: list[Row] = []

    def row(id: str, run: Any, names: tuple[str, ...] = (), area: str = "data", **kw: Any) -> None:
        R.append(Row(id, run, tuple(names), area=area, **kw))

    # -------------------------------------------------------------- §2 data forms (training data)
    row("data-none", fit_data(lambda: None), ("training data",))
    row("data-int", fit_data(lambda: 5), ("int",))
    row("data-str", fit_data(lambda: "train.csv"), ("str",))
    row("data-python-lists", fit_data(lambda: ([[0.1, 0.2, 0.3]] * 8, [[1.0]] * 8)), ("tensor",))
    row("data-empty-tuple", fit_data(lambda: ()), ("empty",))
    row("data-zero-samples", fit_data(lambda: zero(0)), ("empty",))
    row("data-empty-tensordataset", fit_data(lambda: TensorDataset(*zero(0))), ("empty",))
    row("data-empty-dataset", fit_data(lambda: Pairs(*zero(0))), ("empty",))
    row("data-empty-dataloader", fit_data(lambda: DataLoader(Pairs(*zero(0)))), ("empty",))
    row("data-droplast-drops-all", fit_data(lambda: DataLoader(Pairs(*zero(5)), batch_size=8, drop_last=True)),
        ("drop_last",))
    row("data-xy-length-mismatch", fit_data(lambda: (data()[0], data()[1][:50])), ("(64, 3)", "(50, 1)"))
    row("data-xy-length-mismatch-numpy", fit_data(lambda: (data()[0].numpy(), data()[1][:50].numpy())),
        ("samples",))
    row("data-scalar", fit_data(lambda: (torch.tensor(1.0), torch.tensor(2.0))), ("scalar",))
    row("data-object-array", fit_data(lambda: (np.array([object()] * 64), data()[1])), ("dtype",))
    row("data-string-array", fit_data(lambda: (np.array(["a"] * 64), data()[1])), ("dtype",))
    row("data-pandas-string-column", fit_data(lambda: (__import__("pandas").DataFrame({"a": ["x"] * 64}),
                                                       data()[1])), ("dtype",))
    row("data-wrong-features", fit_data(feats(4)), ("forward", "(32, 4)"), max_steps=1)
    row("data-int-inputs", fit_data(lambda: (data()[0].long(), data()[1])), ("int64",), max_steps=1)
    row("data-bool-inputs", fit_data(lambda: (data()[0] > 0, data()[1])), ("bool",), max_steps=1)
    row("data-float16-inputs-become-float32", float16_inputs, expect=CORRECT)
    row("data-target-broadcast-N", fit_data(ys(64)), ("(32, 1)", "(32,)"), max_steps=1)
    row("data-target-wrong-width", fit_data(ys(64, 2)), ("(32, 1)", "(32, 2)"), max_steps=1)
    row("data-target-extra-dim", fit_data(ys(64, 1, 1)), ("(32, 1, 1)",), max_steps=1)
    row("data-nan-input", fit_data(nan_in("x", float("nan"))), ("nan",), area="numerics")
    row("data-inf-target", fit_data(nan_in("y", float("inf"))), ("inf",), area="numerics")
    row("data-dict-input-wrong-key", fit_data(lambda: ({"inputs": data()[0]}, data()[1])), ("keyword", "inputs"),
        max_steps=1)
    row("data-dict-input-right-key", lambda env: ln.setup(Kw, loss=nn.MSELoss()).fit(
        ({"features": data()[0]}, data()[1]), epochs=1, **QUIET), expect=CORRECT)
    row("data-three-items-one-input", fit_data(lambda: (data()[0], data()[0], data()[1])), ("2 positional",),
        max_steps=1)
    row("data-one-item-no-target", fit_data(lambda: (data()[0],)), ("target",), max_steps=1)
    row("data-bare-tensor-no-target", fit_data(lambda: data()[0]), ("target",), max_steps=1)
    row("data-iterable-shuffle", lambda env: fit(train=Stream(), dataloader_options={"shuffle": True}),
        ("IterableDataset", "shuffle"))
    row("data-int-target-mse", int_target_mse, expect=CORRECT)
    row("data-float64-numpy", float64_numpy, expect=CORRECT)
    row("data-pandas", pandas_frames, expect=CORRECT)
    row("data-int32-class-targets", int32_class_targets, expect=CORRECT)
    row("data-one-sample", one_sample, expect=CORRECT)
    row("data-numpy-x-tensor-y", mixed_types, expect=CORRECT)
    # -------------------------------------------------------------- targets vs loss
    row("target-ce-float-indices", clf_fit(lambda y: y.float()), ("CrossEntropyLoss", "float32", "long"),
        area="loss", max_steps=1)
    row("target-ce-Nx1", clf_fit(lambda y: y.unsqueeze(1)), ("squeeze",), area="loss", max_steps=1)
    row("target-ce-out-of-range", clf_fit(lambda y: y + 5), ("out of bounds",), area="loss", max_steps=1)
    row("target-bce-int", bce(lambda y: y.clamp(max=1).unsqueeze(1)), ("BCEWithLogitsLoss", "float"),
        area="loss", max_steps=1)
    row("target-bce-broadcast", bce(lambda y: y.clamp(max=1).float()), ("(32, 1)", "(32,)"), area="loss",
        max_steps=1)
    # -------------------------------------------------------------- validation data (checked before training)
    row("valid-target-broadcast-N", with_valid(lambda: (data(32)[0], data(32)[1][:, 0])), ("(16,)",),
        area="valid data", max_steps=0)
    row("valid-wrong-features", with_valid(lambda: (torch.randn(32, 5), data(32)[1])), ("(16, 5)",),
        area="valid data", max_steps=0)
    row("valid-ce-float-target", clf_valid(lambda y: y.float()), ("float32", "long"), area="valid data",
        max_steps=0)
    row("valid-ce-Nx1", clf_valid(lambda y: y.unsqueeze(1)), ("squeeze",), area="valid data",
        max_steps=0)
    row("valid-empty", with_valid(lambda: zero(0)), ("empty",), area="valid data", max_steps=0)
    row("valid-length-mismatch", with_valid(lambda: (data(32)[0], data(20)[1])), ("samples",), area="valid data",
        max_steps=0)
    row("valid-str", with_valid(lambda: "valid.csv"), ("str",), area="valid data")
    row("valid-bool", with_valid(lambda: True), ("bool",), area="valid data")
    for frac in (0, 1, 1.0, -0.2, 1.5, float("nan"), float("inf")):
        row(f"valid-fraction-{frac}", with_valid(lambda f=frac: f), ("valid_data",), area="valid data")
    row("valid-fraction-one-sample", lambda env: fit(train=data(1), valid_data=0.5), ("2 samples",),
        area="valid data")
    row("valid-fraction-iterable", lambda env: fit(train=Stream(), valid_data=0.2), ("IterableDataset",),
        area="valid data")
    row("valid-fraction-custom-sampler", custom_sampler_fraction, ("sampler",), area="valid data", expect=OK)
    # -------------------------------------------------------------- setup(...)
    row("setup-module-none", setup_fit(lambda: ln.setup(None, loss=nn.MSELoss())), ("module",), area="setup")
    row("setup-module-str", setup_fit(lambda: ln.setup("Net", loss=nn.MSELoss())), ("str",), area="setup")
    row("setup-instance-with-hparams", setup_fit(lambda: ln.setup(Net(), loss=nn.MSELoss()).set_hparams(d_in=3)),
        ("instance",), area="setup")
    row("setup-unknown-hparam", setup_fit(lambda: reg_setup().set_hparams(d_hiden=4)), ("d_hiden",), area="setup")
    row("setup-factory-returns-tensor", setup_fit(lambda: ln.setup(lambda: torch.zeros(1), loss=nn.MSELoss())),
        ("nn.Module",), area="setup")
    row("setup-loss-str", setup_fit(lambda: ln.setup(Net, loss="mse")), ("loss",), area="setup")
    row("setup-loss-class", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss)), ("MSELoss()",), area="setup")
    row("setup-loss-nonscalar", setup_fit(lambda: ln.setup(Net, loss=lambda p, t: (p - t) ** 2)), ("scalar",),
        area="setup", max_steps=1)
    row("setup-loss-returns-float", setup_fit(lambda: ln.setup(Net, loss=lambda p, t: 1.0)), ("scalar",),
        area="setup", max_steps=1)
    row("setup-lambda-loss-broadcast", lambda env: ln.setup(Net, loss=lambda p, t: ((p - t) ** 2).mean()).fit(
        (data()[0], data()[1][:, 0]), epochs=1, **QUIET), ("(32, 1)", "(32,)"), area="setup",
        max_steps=1)
    row("setup-loss-list-single-output", setup_fit(lambda: ln.setup(Net, loss=[nn.MSELoss(), nn.L1Loss()])),
        ("2",), area="setup", max_steps=1)
    row("setup-loss-weights-single-loss", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss(), loss_weights=[1.0])),
        ("loss_weights",), area="setup")
    row("setup-loss-weights-length", setup_fit(lambda: ln.setup(Net, loss=[nn.MSELoss()], loss_weights=[1, 2])),
        ("loss_weights",), area="setup")
    row("setup-no-loss", setup_fit(lambda: ln.setup(Net)), ("loss",), area="setup")
    row("setup-optimizer-str", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss(), optimizer="adam")),
        ("optimizer",), area="setup")
    row("setup-optimizer-instance", setup_fit(lambda: ln.setup(
        Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))),
        ("class",), area="setup")
    row("setup-opt-unknown-kwarg", setup_fit(lambda: reg_setup(momentun=0.9)), ("momentun",), area="setup")
    row("setup-opt-lr-negative", setup_fit(lambda: reg_setup().set_opt_hparams(lr=-1.0)), ("lr",), area="setup")
    row("setup-opt-lr-str", setup_fit(lambda: reg_setup().set_opt_hparams(lr="fast")), ("lr",), area="setup")
    row("setup-metrics-str", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss(), metrics="mae")), ("metrics",),
        area="metrics")
    row("setup-metrics-class", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE])),
        ("MAE",), area="metrics")
    row("setup-metrics-object", setup_fit(lambda: ln.setup(Net, loss=nn.MSELoss(), metrics=[object()])),
        ("object",), area="metrics")
    row("metric-accuracy-binary-logits", accuracy_binary_logits, ("Accuracy",), area="metrics",
        max_steps=1)
    row("metric-auroc-num-classes", auroc_wrong_classes, ("num_classes",), area="metrics", max_steps=1)
    row("metric-binary-auroc-multiclass", binary_auroc_multiclass, ("BinaryAUROC",), area="metrics",
        max_steps=1)
    # -------------------------------------------------------------- fit(...) arguments
    for label, bad in (("0", 0), ("-1", -1), ("2.5", 2.5), ("str", "3"), ("True", True), ("None", None),
                       ("min-above-max", (3, 2)), ("triple", (1, 2, 3)), ("float-pair", (0.5, 2)),
                       ("nan", float("nan"))):
        row(f"fit-epochs-{label}", fit_with(epochs=bad), ("epochs",), area="fit args")
    for label, bad in (("0", 0), ("-1", -1), ("2.5", 2.5), ("str", "32"), ("None", None), ("True", True),
                       ("inf", float("inf"))):
        row(f"fit-batch_size-{label}", fit_with(dataloader_options={"batch_size": bad}), ("batch_size",),
            area="fit args")
    row("fit-batch_size-2.5-dataset", lambda env: fit(train=Pairs(*data()), dataloader_options={"batch_size": 2.5}),
        ("batch_size",), area="fit args")
    row("fit-batch_size-1", batch_size_one, expect=CORRECT, area="fit args")
    row("fit-options-with-dataloader", lambda env: fit(train=DataLoader(Pairs(*data())),
                                                       dataloader_options={"batch_size": 4}),
        ("dataloader_options",), area="fit args")
    row("fit-options-dataset-key", fit_with(dataloader_options={"dataset": Pairs(*data())}), ("dataset",),
        area="fit args")
    row("fit-options-sampler-in-memory", fit_with(dataloader_options={"sampler": Recording(64)}), ("sampler",),
        area="fit args")
    row("fit-options-unknown-key-dataset", lambda env: fit(train=Pairs(*data()), dataloader_options={"bogus": 1}),
        ("bogus",), area="fit args")
    row("fit-options-num_workers-negative", lambda env: fit(train=Pairs(*data()),
                                                            dataloader_options={"num_workers": -1}),
        ("num_workers",), area="fit args")
    row("fit-options-not-a-mapping", fit_with(dataloader_options=[("batch_size", 4), 5]), ("dataloader_options",),
        area="fit args")
    row("fit-seed-str", fit_with(seed="abc"), ("seed",), area="fit args")
    row("fit-seed-float", fit_with(seed=1.5), ("seed",), area="fit args")
    row("fit-callbacks-not-a-list", fit_with(callbacks=cb.TerminateOnNaN()), ("callbacks",), area="fit args")
    row("fit-callbacks-class", fit_with(callbacks=[cb.EarlyStopping]), ("instance",), area="fit args")
    row("fit-callbacks-function", fit_with(callbacks=[lambda ctx: None]), ("callbacks",), area="fit args")
    row("fit-sample_weight-length", sample_weight(lambda: torch.ones(10)), ("sample_weight", "10"),
        area="fit args")
    row("fit-sample_weight-negative", sample_weight(lambda: -torch.ones(64)), ("sample_weight", "negative"),
        area="fit args")
    row("fit-accelerator-str", fit_with(accelerator="cpu"), ("accelerator",), area="accelerator")
    row("fit-accelerator-cuda-on-cpu", cuda_on_cpu, ("cuda",), area="accelerator",
        expect=CORRECT if torch.cuda.is_available() else CLEAR)
    row("accelerator-device-tpu", lambda env: ln.Accelerator(device="tpu"), ("tpu",), area="accelerator")
    row("accelerator-device-banana", lambda env: ln.Accelerator(device="banana"), ("banana",), area="accelerator")
    row("accelerator-precision-64", lambda env: ln.Accelerator(precision="64"), ("precision",), area="accelerator")
    row("accelerator-strategy-bogus", lambda env: ln.Accelerator(strategy="horovod"), ("strategy",),
        area="accelerator")
    row("accelerator-fsdp-units-without-fsdp", lambda env: ln.Accelerator(fsdp_units=(torch.nn.Linear,)),
        ("fsdp_units", "strategy='fsdp'"), area="accelerator")
    row("accelerator-fsdp-units-a-string", lambda env: ln.Accelerator(strategy="fsdp", fsdp_units="Linear"),
        ("fsdp_units", "nn.Module classes"), area="accelerator")
    row("accelerator-fsdp-units-empty", lambda env: ln.Accelerator(strategy="fsdp", fsdp_units=()),
        ("fsdp_units",), area="accelerator")
    row("accelerator-fsdp-float16", lambda env: ln.Accelerator(strategy="fsdp", precision="16-mixed"),
        ("16-mixed", "bf16-mixed"), area="accelerator")
    row("fit-fsdp-one-process", fit_with(accelerator=ln.Accelerator(device="cpu", strategy="fsdp")), expect=CORRECT,
        area="accelerator")
    # -------------------------------------------------------------- callbacks' arguments and monitors
    row("es-monitor-typo", with_callbacks(lambda: cb.EarlyStopping(monitor="valid_los")), ("valid_los", "valid_loss"),
        area="monitor", max_steps=1)
    row("es-monitor-valid-without-valid", with_callbacks(lambda: cb.EarlyStopping(), valid=False),
        ("valid_data",), area="monitor", max_steps=1)
    row("es-mode-bogus", lambda env: cb.EarlyStopping(mode="maximum"), ("mode",), area="monitor")
    row("es-patience-negative", lambda env: cb.EarlyStopping(patience=-1), ("patience",), area="callbacks")
    row("es-patience-float", lambda env: cb.EarlyStopping(patience=1.5), ("patience",), area="callbacks")
    row("es-min_delta-str", lambda env: cb.EarlyStopping(min_delta="a"), ("min_delta",), area="callbacks")
    row("es-baseline-str", lambda env: cb.EarlyStopping(baseline="x"), ("baseline",), area="callbacks")
    row("es-unknown-direction", unknown_direction, ("mode",), area="monitor", max_steps=1)
    row("es-auto-torchmetrics-accuracy", accuracy_auto_max, expect=CORRECT, area="monitor")
    row("mc-monitor-typo", with_callbacks(lambda: cb.ModelCheckpoint("ck/", monitor="valid_mea")), ("valid_mea",),
        area="monitor", max_steps=1)
    row("mc-path-int", lambda env: cb.ModelCheckpoint(path=123), ("path",), area="callbacks")
    row("mc-template-unknown-field", with_callbacks(lambda: cb.ModelCheckpoint("ck/{bogus}.pt")), ("bogus",),
        area="callbacks", max_steps=1)
    row("mc-template-malformed", with_callbacks(lambda: cb.ModelCheckpoint("ck/{epoch:d.pt")), ("template",),
        area="callbacks", max_steps=1)
    row("mc-mode-bogus", lambda env: cb.ModelCheckpoint(mode="best"), ("mode",), area="monitor")
    row("kb-monitor-typo", with_callbacks(lambda: cb.KeepBestModel(monitor="valid_acc")), ("valid_acc",),
        area="monitor", max_steps=1)
    row("lrs-missing-arg", with_callbacks(lambda: cb.LRScheduler(torch.optim.lr_scheduler.StepLR)), ("step_size",),
        area="callbacks", max_steps=1)
    row("lrs-str", lambda env: cb.LRScheduler("StepLR"), ("StepLR",), area="callbacks")
    row("lrs-opt_name-unknown", with_callbacks(lambda: cb.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1,
                                                                      opt_name="gen")), ("gen",),
        area="callbacks", max_steps=1)
    row("lrs-plateau-monitor-typo", with_callbacks(lambda: cb.LRScheduler(
        torch.optim.lr_scheduler.ReduceLROnPlateau, monitor="valid_lss")), ("valid_lss",), area="monitor",
        max_steps=1)
    row("lrs-call_on-bogus", lambda env: cb.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1,
                                                        call_on="on_batch"), ("call_on",), area="callbacks")
    row("clip-max_norm-str", lambda env: cb.GradientClip(max_norm="a"), ("max_norm",), area="callbacks")
    row("clip-max_norm-zero", lambda env: cb.GradientClip(max_norm=0), ("max_norm",), area="callbacks")
    row("clip-max_norm-nan", lambda env: cb.GradientClip(max_norm=float("nan")), ("max_norm",), area="callbacks")
    row("clip-norm_type-zero", lambda env: cb.GradientClip(1.0, norm_type=0), ("norm_type",), area="callbacks")
    row("csv-path-int", lambda env: cb.CSVLogger(123), ("path",), area="callbacks")
    row("csv-path-folder", lambda env: cb.CSVLogger(env.tmp), ("folder",), area="callbacks")
    row("csv-unwritable-folder", csv_unwritable, ("a-file",), area="callbacks", max_steps=1)
    row("autoresume-empty-path", lambda env: cb.AutoResume(""), ("path",), area="callbacks")
    row("autoresume-path-none", lambda env: cb.AutoResume(None), ("path",), area="callbacks")
    row("autoresume-keep_last-zero", lambda env: cb.AutoResume("r", keep_last=0), ("keep_last",), area="callbacks")
    # -------------------------------------------------------------- predict / evaluate
    row("predict-none", predict(lambda: None), ("prediction data",), area="predict/evaluate")
    row("predict-str", predict(lambda: "x.csv"), ("str",), area="predict/evaluate")
    row("predict-empty", predict(lambda: torch.zeros(0, 3)), ("empty",), area="predict/evaluate")
    row("predict-wrong-features", predict(lambda: torch.randn(8, 5)), ("(8, 5)",), area="predict/evaluate")
    row("predict-int-inputs", predict(lambda: torch.ones(8, 3, dtype=torch.long)), ("int64",),
        area="predict/evaluate")
    row("predict-batch_size-zero", predict(lambda: torch.randn(8, 3), dataloader_options={"batch_size": 0}),
        ("batch_size",), area="predict/evaluate")
    row("predict-options-unknown", predict(lambda: torch.randn(8, 3), dataloader_options={"bogus": 1}), ("bogus",),
        area="predict/evaluate")
    row("predict-values", predict_values, expect=CORRECT, area="predict/evaluate")
    row("evaluate-no-target", evaluate(lambda: torch.randn(8, 3)), ("target",), area="predict/evaluate")
    row("evaluate-target-broadcast", evaluate(lambda: (torch.randn(8, 3), torch.randn(8))), ("(8, 1)", "(8,)"),
        area="predict/evaluate")
    row("evaluate-length-mismatch", evaluate(lambda: (torch.randn(8, 3), torch.randn(6, 1))), ("samples",),
        area="predict/evaluate")
    row("evaluate-metrics-str", evaluate(lambda: data(), metrics="mae"), ("metrics",), area="predict/evaluate")
    row("evaluate-empty", evaluate(lambda: zero(0)), ("empty",), area="predict/evaluate")
    # -------------------------------------------------------------- tuning and lr_finder
    row("tune-n_trials-negative", tune_negative, ("n_trials",), area="tuning")
    row("tune-existing-study-name", tune_existing_study, ("taken", "load_if_exists"), area="tuning")
    row("lr_finder-steps-zero", lr_finder(steps=0), ("steps",), area="tuning")
    row("lr_finder-start-above-end", lr_finder(start_lr=1.0, end_lr=1e-3), ("start_lr",), area="tuning")
    return R


ROWS = rows()


@pytest.mark.parametrize("row", params(ROWS))
def test_bad_input(row: Row) -> None:
    check_row(GROUP, row)

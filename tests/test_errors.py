"""Bad input: refused before or at the first batch with a message naming the problem and the fix (API.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln
from lanterna.errors import DataError, LanternaError, ModelCallError, ShapeMismatchError, TargetDtypeError

X = torch.randn(40, 3)


def fit(loss, y, out=1, x=X, module=None, **kw):
    s = ln.setup(module or nn.Linear, loss=loss)
    if module is None:
        s = s.set_hparams(in_features=3, out_features=out)
    kw.setdefault("epochs", 1)
    return s.fit((x, y) if y is not None else x, verbose=False, **kw)


def test_errors_are_lanterna_errors_and_builtin_kinds():
    assert issubclass(DataError, ValueError) and issubclass(DataError, LanternaError)
    assert issubclass(ShapeMismatchError, ValueError) and issubclass(TargetDtypeError, TypeError)
    assert issubclass(ModelCallError, TypeError)


def test_n_1_predictions_against_an_n_target_with_mse_names_both_shapes_and_the_fix():
    with pytest.raises(ShapeMismatchError, match=r"output tensor\(32, 1\) float32 and target tensor\(32,\) float32"
                       r".*broadcast them to \(32, 32\).*y\.unsqueeze\(1\)"):
        fit(nn.MSELoss(), torch.randn(40))


def test_an_n_output_against_an_n_1_target_suggests_squeezing():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).squeeze(1)

    with pytest.raises(ShapeMismatchError, match=r"tensor\(32,\).*tensor\(32, 1\).*y\.squeeze\(1\)"):
        fit(nn.MSELoss(), torch.randn(40, 1), module=Flat)


@pytest.mark.parametrize("loss", [nn.BCEWithLogitsLoss(), nn.BCELoss()], ids=["BCEWithLogitsLoss", "BCELoss"])
def test_integer_targets_for_bce_name_the_target_dtype_and_the_conversion(loss):
    y = torch.randint(0, 2, (40, 1))
    module = None if isinstance(loss, nn.BCEWithLogitsLoss) else (lambda: nn.Sequential(nn.Linear(3, 1), nn.Sigmoid()))
    with pytest.raises(TargetDtypeError, match=rf"{type(loss).__name__} needs a floating-point target.*"
                                               r"tensor\(32, 1\) int64.*y = y\.float\(\)"):
        fit(loss, y, module=module)


def test_float_class_indices_for_cross_entropy_name_the_conversion():
    y = torch.randint(0, 3, (40,)).float()
    with pytest.raises(TargetDtypeError, match=r"CrossEntropyLoss takes class indices.*tensor\(32,\) float32"
                                               r".*y = y\.long\(\)"):
        fit(nn.CrossEntropyLoss(), y, out=3)


def test_n_1_class_indices_for_cross_entropy_suggest_squeezing():
    with pytest.raises(ShapeMismatchError, match=r"CrossEntropyLoss.*tensor\(32, 1\) int64.*y\.squeeze\(1\)"):
        fit(nn.CrossEntropyLoss(), torch.randint(0, 3, (40, 1)), out=3)


def test_class_probabilities_for_cross_entropy_are_fine():
    probs = torch.softmax(torch.randn(40, 3), dim=1)
    assert fit(nn.CrossEntropyLoss(), probs, out=3).history[-1]["train_loss"] > 0


def test_integer_targets_with_mse_are_fine_and_train():
    y = (X @ torch.tensor([1.0, -2.0, 0.5])).round().long().unsqueeze(1)
    fitted = (ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
              .set_opt_hparams(lr=0.05).fit((X, y), epochs=30, verbose=False, seed=0))
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"] / 4


@pytest.mark.parametrize(
    "data",
    [
        pytest.param((torch.empty(0, 3), torch.empty(0, 1)), id="tensors"),
        pytest.param(TensorDataset(torch.empty(0, 3), torch.empty(0, 1)), id="dataset"),
        pytest.param(DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 1)), batch_size=4), id="dataloader"),
    ],
)
def test_empty_data_is_refused(data):
    with pytest.raises(DataError, match="empty"):
        ln.setup(Net, loss=nn.MSELoss()).fit(data, epochs=1, verbose=False)


def test_empty_validation_data_is_refused():
    with pytest.raises(DataError, match="validation data.*empty"):
        ln.setup(Net, loss=nn.MSELoss()).fit((torch.randn(8, 3), torch.randn(8, 1)),
                                             valid_data=(torch.empty(0, 3), torch.empty(0, 1)), verbose=False)


def test_drop_last_that_drops_everything_is_refused():
    dl = DataLoader(TensorDataset(torch.randn(5, 3), torch.randn(5, 1)), batch_size=8, drop_last=True)
    with pytest.raises(DataError, match="no batches"):
        ln.setup(Net, loss=nn.MSELoss()).fit(dl, epochs=1, verbose=False)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.2, -0.5])
def test_a_validation_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(DataError, match=rf"valid_data={fraction}.*strictly between 0 and 1"):
        fit(nn.MSELoss(), torch.randn(40, 1), valid_data=fraction)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

    def forward(self, wide, deep):
        return self.a(wide) + self.b(deep)


def test_a_forward_that_cannot_take_the_batch_says_which_arity_was_tried():
    with pytest.raises(ModelCallError, match=r"TwoInputs\.forward\(wide, deep\).*tried model\(x\) with 1 "
                                             r"positional input.*missing a required argument: 'deep'"):
        fit(nn.MSELoss(), torch.randn(40, 1), module=TwoInputs)
    with pytest.raises(ModelCallError, match=r"model\(\*inputs\) with 3 positional inputs"):
        fit(nn.MSELoss(), torch.randn(40, 1), x=(X, X[:, :2], X), module=TwoInputs)
    with pytest.raises(ModelCallError, match=r"model\(\*\*input\) with keyword inputs wide, other"):
        fit(nn.MSELoss(), torch.randn(40, 1), x={"wide": X, "other": X[:, :2]}, module=TwoInputs)


def test_evaluate_without_targets_is_refused():
    fitted = fit(nn.MSELoss(), torch.randn(40, 1))
    with pytest.raises(DataError, match=r"evaluate\(\) found nothing to compute: the data has no targets"):
        fitted.evaluate(X)


def test_a_batch_without_target_cannot_be_trained_with_a_loss():
    with pytest.raises(LanternaError, match="no target.*Pass \\(x, y\\)"):
        ln.setup(Net, loss=nn.MSELoss()).fit(TensorDataset(torch.randn(8, 3)), epochs=1, verbose=False)


@pytest.mark.parametrize(
    "data, match",
    [
        pytest.param("train.csv", "Unsupported training data of type str", id="string"),
        pytest.param({"x": [1.0, 2.0], "y": [0.0, 1.0]}, "is a float.*Python lists", id="dict-of-lists"),
        pytest.param([[1.0, 2.0, 3.0]], "is a float.*torch.tensor", id="list-of-lists"),
        pytest.param(42, "Unsupported training data of type int", id="int"),
        pytest.param(None, "needs training data", id="none"),
        pytest.param((np.array(["a", "b"]), np.zeros(2)), "not numeric", id="string-array"),
    ],
)
def test_data_of_an_unsupported_type_is_refused(data, match):
    with pytest.raises(DataError, match=match):
        ln.setup(Net, loss=nn.MSELoss()).fit(data, epochs=1, verbose=False)


def test_dataloader_options_together_with_a_dataloader_are_refused():
    dl = DataLoader(TensorDataset(X, torch.randn(40, 1)), batch_size=8)
    with pytest.raises(DataError, match="dataloader_options were given together with a DataLoader"):
        ln.setup(Net, loss=nn.MSELoss()).fit(dl, epochs=1, verbose=False, dataloader_options={"batch_size": 4})
    with pytest.raises(DataError, match="dataloader_options.*DataLoader"):
        ln.setup(Net, loss=nn.MSELoss()).fit(dl, valid_data=0.2, epochs=1, verbose=False,
                                             dataloader_options={"batch_size": 4})


def test_an_optimizer_instance_instead_of_a_class_is_refused():
    opt = torch.optim.Adam(nn.Linear(1, 1).parameters())
    with pytest.raises(LanternaError, match=r"optimizer= got an instance of Adam; pass the class "
                                            r"\(optimizer=torch\.optim\.Adam\).*set_opt_hparams"):
        ln.setup(Net, loss=nn.MSELoss(), optimizer=opt).fit((X, torch.randn(40, 1)), epochs=1, verbose=False)


def test_bad_optimizer_options_are_refused():
    with pytest.raises(LanternaError, match="Could not create the optimizer with {'learning_rate': 0.1}"):
        ln.setup(Net, loss=nn.MSELoss()).set_opt_hparams(learning_rate=0.1).fit(
            (X, torch.randn(40, 1)), epochs=1, verbose=False)


def test_a_loss_class_instead_of_an_instance_is_refused():
    with pytest.raises(LanternaError, match=r"loss=MSELoss is a class; pass an instance, e\.g\. loss=MSELoss\(\)"):
        ln.setup(Net, loss=nn.MSELoss).fit((X, torch.randn(40, 1)), epochs=1, verbose=False)


def test_a_loss_class_inside_a_list_or_dict_is_refused():
    with pytest.raises(LanternaError, match=r"loss\[1\]=L1Loss is a class; pass an instance"):
        ln.setup(Net, loss=[nn.MSELoss(), nn.L1Loss]).fit((X, torch.randn(40, 1)), epochs=1, verbose=False)
    with pytest.raises(LanternaError, match=r"loss\['aux'\] must be callable"):
        ln.setup(Net, loss={"main": nn.MSELoss(), "aux": 0.5}).fit((X, torch.randn(40, 1)), epochs=1, verbose=False)


def test_no_loss_at_all_is_refused():
    with pytest.raises(LanternaError, match="No loss: pass loss="):
        ln.setup(Net).fit((X, torch.randn(40, 1)), epochs=1, verbose=False)


def test_hparams_the_module_does_not_take_are_refused():
    with pytest.raises(LanternaError, match="Net cannot be built with hparams.*d_hiden"):
        ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_hiden=3).fit((X, torch.randn(40, 1)), verbose=False)


def test_hparams_with_a_module_instance_are_refused():
    with pytest.raises(LanternaError, match="needs a module class or factory"):
        ln.setup(Net(), loss=nn.MSELoss()).set_hparams(d_in=3).fit((X, torch.randn(40, 1)), verbose=False)


@pytest.mark.parametrize("epochs", [0, (3, 2), (1, 2, 3), -1])
def test_bad_epochs_are_refused(epochs):
    with pytest.raises(LanternaError, match="epochs="):
        fit(nn.MSELoss(), torch.randn(40, 1), epochs=epochs)


def test_a_callback_class_instead_of_an_instance_is_refused():
    class Noop(ln.Callback):
        pass

    with pytest.raises(LanternaError, match="Did you pass a class instead of an instance"):
        fit(nn.MSELoss(), torch.randn(40, 1), callbacks=[Noop])


def test_evaluate_without_a_loss_or_metrics_says_so_and_how_to_fix():
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    fitted = ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    bare = ln.Fitted(fitted.model, None, [])
    with pytest.raises(DataError, match=r"no loss and no metrics.*ln\.load\(path, loss=nn\.MSELoss\(\)\)"):
        bare.evaluate((x, y))
    with pytest.raises(DataError, match=r"the data has no targets"):
        fitted.evaluate(x)
    assert set(bare.evaluate((x, y), metrics=[ln.metrics.MAE()]).metrics) == {"mae"}

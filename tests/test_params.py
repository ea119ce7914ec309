"""Parameter groups (issue 4, seed 003): weight decay on weights but not on biases and norm layers, per-group
options through set_optimizers, and an init function applied as part of the setup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lanterna as ln


class Net(nn.Module):
    def __init__(self, d_in: int = 4, d_hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.ReLU())
        self.head = nn.Linear(d_hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(n, 1, generator=g)


def test_param_groups_split_weights_from_biases_and_norm_layers():
    groups = ln.param_groups(Net(), weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    net = Net()
    groups = ln.param_groups(net, weight_decay=0.1)
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert decay_ids == {id(net.body[0].weight), id(net.head.weight)}
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    assert no_decay_ids == {id(net.body[0].bias), id(net.body[1].weight), id(net.body[1].bias), id(net.head.bias)}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_biases_and_norm_layers_untouched_by_decay_when_the_gradient_is_zero():
    """With a zero gradient, SGD's only update is the decay: weights shrink, biases and norms do not move."""

    class ZeroGrad(Net):
        def loss(self, pred, target):
            return pred.sum() * 0.0

    x, y = _data()
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in ZeroGrad().state_dict().items()}
    fitted = (ln.setup(ZeroGrad, optimizer=ln.with_param_groups(torch.optim.SGD))
              .set_opt_hparams(lr=0.1, weight_decay=0.5).fit((x, y), epochs=2, seed=0, verbose=False))
    after = fitted.model.state_dict()
    steps = 2 * 4
    for name, value in after.items():
        if name.endswith("weight") and not name.startswith("body.1"):
            torch.testing.assert_close(value, before[name] * (1 - 0.1 * 0.5) ** steps)
        else:
            assert torch.equal(value, before[name]), name


def test_with_param_groups_equals_the_hand_built_optimizer_of_seed_003():
    """Seed 003: SGD([{'params': weights, 'weight_decay': wd}, {'params': biases}], lr=lr) — bit for bit."""
    x, y = _data()
    lr, wd, epochs = 0.05, 3e-2, 3
    torch.manual_seed(0)
    ref = Net()
    opt = torch.optim.SGD([
        {"params": [ref.body[0].weight, ref.head.weight], "weight_decay": wd},
        {"params": [ref.body[0].bias, ref.body[1].weight, ref.body[1].bias, ref.head.bias]},
    ], lr=lr)
    for _ in range(epochs):
        for lo in range(0, len(x), 32):
            opt.zero_grad()
            F.mse_loss(ref(x[lo:lo + 32]), y[lo:lo + 32]).backward()
            opt.step()
    fitted = (ln.setup(Net, loss=nn.MSELoss(), optimizer=ln.with_param_groups(torch.optim.SGD, wd))
              .set_opt_hparams(lr=lr)
              .fit((x, y), epochs=epochs, seed=0, verbose=False, dataloader_options={"shuffle": False}))
    for (name, a), b in zip(fitted.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    groups = fitted.optimizers["opt"].param_groups
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [wd, 0.0]


def test_weight_decay_from_set_opt_hparams_applies_to_the_weights_only():
    x, y = _data(32)
    fitted = (ln.setup(Net, loss=nn.MSELoss(), optimizer=ln.with_param_groups(torch.optim.AdamW))
              .set_opt_hparams(lr=1e-3, weight_decay=0.05).fit((x, y), epochs=1, verbose=False))
    assert [g["weight_decay"] for g in fitted.optimizers["opt"].param_groups] == [0.05, 0.0]


def test_per_group_options_through_set_optimizers():
    class Finetune(Net):
        def set_optimizers(self, lr=1e-3, weight_decay=0.01):
            groups = ln.param_groups(self, weight_decay, options={"head": {"lr": lr * 10}})
            return torch.optim.AdamW(groups, lr=lr)

    x, y = _data(32)
    fitted = ln.setup(Finetune, loss=nn.MSELoss()).set_opt_hparams(lr=1e-3).fit((x, y), epochs=1, verbose=False)
    groups = {g["name"]: g for g in fitted.optimizers["opt"].param_groups}
    assert set(groups) == {"decay", "no_decay", "head.decay", "head.no_decay"}
    assert groups["head.decay"]["lr"] == pytest.approx(1e-2) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["head.no_decay"]["weight_decay"] == 0.0 and groups["head.decay"]["weight_decay"] == 0.01
    model = fitted.model
    assert groups["head.decay"]["params"] == [model.head.weight]


def test_exclude_globs_and_frozen_parameters():
    net = Net()
    net.body[0].requires_grad_(False)
    groups = ln.param_groups(net, 0.1, exclude=["head.weight"])
    assert [g["name"] for g in groups] == ["no_decay"]  # body.0 frozen, head.weight excluded
    assert len(groups[0]["params"]) == 4


def test_bare_parameters_fall_back_to_the_dimension_rule():
    net = Net()
    opt = ln.with_param_groups(torch.optim.SGD, 0.1)(net.parameters(), lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_param_group_errors_name_the_fix():
    with pytest.raises(ln.LanternaError, match=r"\['backbone'\] match no trainable parameter.*body\.0\.weight"):
        ln.param_groups(Net(), options={"backbone": {"lr": 1e-4}})
    with pytest.raises(ln.LanternaError, match=r"options of 'head' must be a dict"):
        ln.param_groups(Net(), options={"head": 0.1})
    with pytest.raises(ln.LanternaError, match="optimizer class"):
        ln.with_param_groups(torch.optim.SGD(Net().parameters(), lr=0.1))
    with pytest.raises(ln.LanternaError, match="needs the model"):
        ln.with_param_groups(torch.optim.SGD, options={"head": {"lr": 1}})(Net().parameters(), lr=0.1)


# ---------------------------------------------------------------------------- init


def init_weights(m: nn.Module) -> None:
    """Seed 003's init function."""
    if type(m) == nn.Linear:  # noqa: E721 - the seed's own test
        nn.init.normal_(m.weight, std=0.01)


def test_with_init_applies_the_init_function_when_the_module_is_built():
    setup = ln.setup(ln.with_init(Net, init_weights), loss=nn.MSELoss()).set_hparams(d_hidden=256)
    model = setup.build_model()
    assert isinstance(model, Net)
    assert float(model.body[0].weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert float(model.head.weight.detach().std()) == pytest.approx(0.01, rel=0.2)
    assert torch.equal(model.body[1].weight, torch.ones(256))  # LayerNorm untouched


def test_with_init_is_seeded_keeps_the_signature_and_trains():
    factory = ln.with_init(Net, init_weights)
    assert factory.__name__ == "Net" and factory.__module__ == Net.__module__ and issubclass(factory, Net)
    x, y = _data()
    a = ln.setup(factory, loss=nn.MSELoss()).set_opt_hparams(lr=0.01).fit((x, y), epochs=15, seed=4, verbose=False)
    b = ln.setup(factory, loss=nn.MSELoss()).set_opt_hparams(lr=0.01).fit((x, y), epochs=15, seed=4, verbose=False)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert a.history[-1]["train_loss"] < 0.2 * a.history[0]["train_loss"]
    with pytest.raises(ln.LanternaError, match="d_hiden"):
        ln.setup(factory, loss=nn.MSELoss()).set_hparams(d_hiden=3).fit((x, y), epochs=1, verbose=False)
    with pytest.raises(ln.LanternaError, match="not an instance"):
        ln.with_init(Net(), init_weights)


def test_a_model_built_with_init_saves_and_reloads_as_the_module(tmp_path):
    x, y = _data(64)
    fitted = ln.setup(ln.with_init(Net, init_weights), loss=nn.MSELoss()).set_hparams(d_hidden=8).fit(
        (x, y), epochs=2, seed=0, verbose=False)
    fitted.save(tmp_path / "model")
    loaded = ln.load(tmp_path / "model")
    assert type(loaded.model) is Net and isinstance(fitted.model, Net)
    torch.testing.assert_close(loaded.predict(x), fitted.predict(x), rtol=0, atol=0)


def test_with_init_wraps_a_factory_function_too():
    def make(width: int = 8) -> nn.Module:
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

    model = ln.setup(ln.with_init(make, init_weights)).set_hparams(width=300).build_model()
    assert float(model[0].weight.detach().std()) == pytest.approx(0.01, rel=0.1)


def test_with_init_applies_to_the_module_itself_when_init_tests_its_exact_type():
    """A hand-written init tests ``type(m) == nn.Linear``; with_init's subclass must still match at the root."""

    def init_weights(m):
        if type(m) == nn.Linear:  # noqa: E721 - the seeds' idiom
            nn.init.constant_(m.weight, 0.5)

    fitted = ln.setup(ln.with_init(nn.Linear, init_weights), loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.0).fit((torch.randn(8, 3), torch.randn(8, 1)), epochs=1,
                                                                   verbose=False)
    assert torch.equal(fitted.model.weight, torch.full((1, 3), 0.5))
    assert isinstance(fitted.model, nn.Linear)

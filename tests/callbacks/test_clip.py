"""GradientClip: the gradient norm at the optimizer step is bounded, exactly as clip_grad_norm_ does it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import luz_net_setup, make_luz_data
from torch import nn

import lanterna as ln


class GradNorms(ln.Callback):
    """Total gradient norm seen just before the optimizer step (after GradientClip, order 100)."""

    order = 200

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type
        self.norms: list[float] = []

    def on_train_batch_before_step(self, ctx):
        grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, self.norm_type) for g in grads]), self.norm_type)))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g) * 10  # large inputs: large gradients
    return x, x.sum(1, keepdim=True) * 5


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_grad_norm_is_bounded(norm_type):
    setup = ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=1e-3)
    raw = GradNorms(norm_type)
    setup.fit(_data(), epochs=2, seed=0, callbacks=[raw], verbose=False)
    assert max(raw.norms) > 10  # without clipping the gradients are large
    clipped = GradNorms(norm_type)
    setup.fit(_data(), epochs=2, seed=0, callbacks=[ln.callbacks.GradientClip(1.0, norm_type=norm_type), clipped],
              verbose=False)
    assert len(clipped.norms) == 4 and max(clipped.norms) <= 1.0 + 1e-5
    assert min(clipped.norms) == pytest.approx(1.0, rel=1e-5)  # every step was clipped to the bound


def test_same_weights_as_a_hand_written_loop_with_clip_grad_norm():
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    reference = copy.deepcopy(model)
    ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=1e-3).fit(
        (x, y), epochs=3, verbose=False, callbacks=[ln.callbacks.GradientClip(0.5)],
        dataloader_options={"batch_size": 16, "shuffle": False})
    opt = torch.optim.SGD(reference.parameters(), lr=1e-3)
    for _ in range(3):
        for i in range(0, 64, 16):
            loss = nn.functional.mse_loss(reference(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_the_stepping_optimizer_is_clipped():
    norms = {}

    class TwoSteps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def set_optimizers(self, lr=1e-3):
            return {"a": torch.optim.SGD(self.a.parameters(), lr=lr), "b": torch.optim.SGD(self.b.parameters(), lr=lr)}

        def step(self, ctx):
            ctx.pred = self.a(ctx.input)
            ctx.loss = nn.functional.mse_loss(ctx.pred, ctx.target)
            if ctx.training:
                ctx.backward(ctx.loss)
                ctx.step_optimizer("a")
                # a gets gradients here too, but only b steps: a's must be left as they are
                loss_b = nn.functional.mse_loss(self.a(ctx.input) + self.b(ctx.input), ctx.target)
                ctx.backward(loss_b)
                ctx.step_optimizer("b")

    class Probe(ln.Callback):
        order = 200

        def on_train_batch_before_step(self, ctx):
            for name in ("a", "b"):
                grads = [p.grad.flatten() for p in getattr(ctx.model, name).parameters() if p.grad is not None]
                if grads:
                    norms.setdefault((ctx.current_opt, name), []).append(float(torch.cat(grads).norm()))

    ln.setup(TwoSteps).fit(_data(), epochs=1, verbose=False,
                           callbacks=[ln.callbacks.GradientClip(0.25), Probe()])
    assert set(norms) == {("a", "a"), ("b", "a"), ("b", "b")}
    assert all(n == pytest.approx(0.25, rel=1e-5) for n in norms[("a", "a")] + norms[("b", "b")])
    assert min(norms[("b", "a")]) > 1.0  # a's gradients at b's step were not clipped


def test_bad_arguments():
    with pytest.raises(ln.LanternaError, match="max_norm must be a positive finite number"):
        ln.callbacks.GradientClip(0)
    with pytest.raises(ln.LanternaError, match="norm_type"):
        ln.callbacks.GradientClip(1.0, norm_type=-2)


def test_16_mixed_clips_the_unscaled_gradients():
    seen = []

    class Probe(ln.Callback):
        order = 200

        def on_train_batch_before_step(self, ctx):
            norm = float(torch.cat([p.grad.flatten() for p in ctx.model.parameters()]).norm())
            seen.append((norm, float(ctx.scaler.get_scale())))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(in_features=3, out_features=1).fit(
        (x, x.sum(1, keepdim=True) * 3), epochs=2, verbose=False, seed=0, callbacks=[ln.callbacks.GradientClip(1.0),
                                                                                     Probe()],
        accelerator=ln.Accelerator(device="cpu", precision="16-mixed"))
    finite = [(n, s) for n, s in seen if n == n]  # steps whose float16 gradients overflowed are skipped by the scaler
    assert len(finite) >= 10
    # in true units (the scale is in the thousands): clipped to max_norm
    assert all(n == pytest.approx(1.0, rel=1e-4) and s >= 1024 for n, s in finite)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_norm": "a"}, r"GradientClip\(max_norm='a'\): max_norm must be a positive finite number"),
    ({"max_norm": None}, r"max_norm=None.*positive finite number"),
    ({"max_norm": True}, r"max_norm=True.*positive finite number"),
    ({"max_norm": float("inf")}, r"max_norm=inf.*positive finite number"),
    ({"max_norm": float("nan")}, r"max_norm=nan.*positive finite number"),
    ({"max_norm": -1.0}, r"max_norm=-1.0.*positive finite number"),
    ({"max_norm": torch.tensor([1.0, 2.0])}, r"max_norm=.*positive finite number"),
    ({"max_norm": 1.0, "norm_type": "l2"}, r"GradientClip\(norm_type='l2'\): norm_type must be a positive number"),
    ({"max_norm": 1.0, "norm_type": 0}, r"norm_type=0.*positive number.*'inf'"),
    ({"max_norm": 1.0, "norm_type": float("nan")}, r"norm_type=nan"),
    ({"max_norm": 1.0, "norm_type": None}, r"norm_type=None"),
])
def test_bad_arguments_are_refused_in_the_constructor_naming_the_argument(kwargs, message):
    with pytest.raises(ln.LanternaError, match=message):
        ln.callbacks.GradientClip(**kwargs)


def test_accepted_argument_forms():
    assert ln.callbacks.GradientClip(2).max_norm == 2.0
    assert ln.callbacks.GradientClip(torch.tensor(0.5)).max_norm == 0.5
    assert ln.callbacks.GradientClip(1.0, norm_type="inf").norm_type == float("inf")
    assert ln.callbacks.GradientClip(1.0, norm_type="INF").norm_type == float("inf")
    assert ln.callbacks.GradientClip(1.0, norm_type=1).norm_type == 1.0


def test_gradient_clip_limits_the_norm_the_optimizer_sees():
    norms = []

    class Late(ln.Callback):
        order = 1000  # after GradientClip's documented order

        def on_train_batch_before_step(self, ctx):
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ctx.model.parameters()])))

    x, y = make_luz_data(64)
    y = y * 100  # big gradients
    luz_net_setup().fit((x, y), epochs=1, verbose=False, callbacks=[ln.callbacks.GradientClip(max_norm=0.5), Late()])
    assert norms and max(norms) <= 0.5 + 1e-4

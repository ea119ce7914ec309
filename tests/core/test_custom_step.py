"""Custom steps and several optimizers (issue 4): seed 002's GAN with set_optimizers + step(ctx), ctx.log,
validation with ctx.training False, the bad-input warnings and errors, the shared forward pass of the default
step with several optimizers, and gradient accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import HISTORY_BASE, Net, history_keys, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln

MU = torch.tensor([3.0, -2.0])


def gaussian_data(n: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + 0.5 * torch.randn(n, 2, generator=g)


class GAN(nn.Module):
    """Seed 002's GAN on 2-D points: a generator and a discriminator trained by two optimizers."""

    def __init__(self, latent: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.latent = latent
        self.G = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.D = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.G(z)

    def set_optimizers(self, lr: float = 2e-3) -> dict[str, torch.optim.Optimizer]:
        return {"d": torch.optim.Adam(self.D.parameters(), lr=lr, betas=(0.5, 0.999)),
                "g": torch.optim.Adam(self.G.parameters(), lr=lr, betas=(0.5, 0.999))}

    def step(self, ctx: ln.Context) -> None:
        real = ctx.input
        n = real.shape[0]
        fake = self.G(torch.randn(n, self.latent))
        ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
        d_loss = (F.binary_cross_entropy_with_logits(self.D(real), ones)
                  + F.binary_cross_entropy_with_logits(self.D(fake.detach()), zeros))
        if ctx.training:
            ctx.backward(d_loss)
            ctx.step_optimizer("d")
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        if ctx.training:
            ctx.backward(g_loss)
            ctx.step_optimizer("g")
        ctx.log("d_loss", d_loss)
        ctx.log("g_loss", g_loss)
        ctx.loss = g_loss
        ctx.pred = fake


class WatchGeneratorStep(ln.Callback):
    """Checks that the generator's optimizer step leaves the discriminator untouched (and moves G)."""

    def __init__(self) -> None:
        self.g_steps = 0

    def on_train_batch_before_step(self, ctx: ln.Context) -> None:
        if ctx.current_opt == "g":
            self.d_before = [p.detach().clone() for p in ctx.model.D.parameters()]
            self.g_before = [p.detach().clone() for p in ctx.model.G.parameters()]

    def on_train_batch_after_step(self, ctx: ln.Context) -> None:
        if ctx.current_opt == "g":
            self.g_steps += 1
            assert all(torch.equal(a, p) for a, p in zip(self.d_before, ctx.model.D.parameters()))
            assert not all(torch.equal(a, p) for a, p in zip(self.g_before, ctx.model.G.parameters()))


def _generated_mean(model: GAN, n: int = 4000) -> torch.Tensor:
    with torch.no_grad():
        return model.G(torch.randn(n, model.latent, generator=torch.Generator().manual_seed(5))).mean(0)


class GeneratedMean(ln.Callback):
    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []

    def on_epoch_end(self, ctx: ln.Context) -> None:
        self.means.append(_generated_mean(ctx.model))


def test_gan_trains_with_two_optimizers_and_logs_both_losses(capsys):
    x = gaussian_data()
    torch.manual_seed(1)
    start = _generated_mean(GAN())
    watch, means = WatchGeneratorStep(), GeneratedMean()
    fitted = ln.setup(GAN).fit(x, epochs=30, dataloader_options={"batch_size": 64}, seed=1,
                               callbacks=[watch, means], verbose=True)
    out = capsys.readouterr().out
    last = fitted.history[-1]
    assert {"train_d_loss", "train_g_loss", "train_loss"} <= set(last)
    assert all("train_d_loss" in rec and "train_g_loss" in rec for rec in fitted.history)
    assert last["train_loss"] == pytest.approx(last["train_g_loss"], rel=1e-6)
    assert "d_loss: " in out and "g_loss: " in out  # ctx.log values on the console like any metric
    assert watch.g_steps == 30 * 16
    assert torch.dist(start, MU) > 2.5  # the untrained generator is far from the data
    # a GAN circles around the equilibrium: its mean over the last epochs sits on the data mean
    assert torch.dist(torch.stack(means.means[-10:]).mean(0), MU) < 0.25
    assert torch.dist(_generated_mean(fitted.model), MU) < 0.75
    assert set(fitted.optimizers) == {"d", "g"}


def test_gan_matches_the_hand_written_loop_bit_for_bit():
    """The seed's loop (zero_grad before each backward, D then G) and lanterna's step leave identical weights:
    the generator's backward also reaches D, and those gradients must not leak into D's next step."""
    x = gaussian_data(256)
    epochs, bs, seed = 3, 32, 7
    fitted = ln.setup(GAN).fit(DataLoader(TensorDataset(x), batch_size=bs, shuffle=True), epochs=epochs,
                               seed=seed, verbose=False)

    torch.manual_seed(seed)
    model = GAN()
    opts = model.set_optimizers()
    loader = DataLoader(TensorDataset(x), batch_size=bs, shuffle=True)
    for _ in range(epochs):
        for (real,) in loader:
            n = real.shape[0]
            fake = model.G(torch.randn(n, model.latent))
            ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
            opts["d"].zero_grad()
            d_loss = (F.binary_cross_entropy_with_logits(model.D(real), ones)
                      + F.binary_cross_entropy_with_logits(model.D(fake.detach()), zeros))
            d_loss.backward()
            opts["d"].step()
            opts["g"].zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(model.D(fake), ones)
            g_loss.backward()
            opts["g"].step()
    for (name, a), b in zip(fitted.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_custom_step_validates_with_training_false():
    seen = []

    class Probe(GAN):
        def step(self, ctx):
            seen.append((ctx.training, torch.is_grad_enabled()))
            before = [p.detach().clone() for p in self.parameters()] if not ctx.training else None
            super().step(ctx)
            if before is not None:
                assert all(torch.equal(a, p) for a, p in zip(before, self.parameters()))

    x = gaussian_data(256)
    fitted = ln.setup(Probe).fit(x[:192], valid_data=x[192:], epochs=2, verbose=False,
                                 dataloader_options={"batch_size": 64})
    assert seen.count((True, True)) == 2 * 3 and seen.count((False, False)) == 2 * 1
    assert {"valid_loss", "valid_d_loss", "valid_g_loss"} <= set(fitted.history[-1])


def test_step_without_backward_warns_once():
    class NoBackward(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def step(self, ctx):
            ctx.loss = F.mse_loss(self.lin(ctx.input), ctx.target)

    x, y = torch.randn(64, 3), torch.randn(64, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ln.setup(NoBackward).fit((x, y), epochs=2, verbose=False, dataloader_options={"batch_size": 16})
    msgs = [str(w.message) for w in caught if "backward" in str(w.message)]
    assert len(msgs) == 1
    assert "ctx.backward(loss)" in msgs[0] and "ctx.step_optimizer()" in msgs[0]


def test_step_that_steps_the_optimizer_itself_does_not_warn():
    class Manual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def step(self, ctx):
            loss = F.mse_loss(self.lin(ctx.input), ctx.target)
            if ctx.training:
                loss.backward()
                ctx.opt.step()
                ctx.opt.zero_grad(set_to_none=True)
            ctx.loss = loss

    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = ln.setup(Manual).set_opt_hparams(lr=0.05).fit((x, y), epochs=20, verbose=False)
    assert fitted.history[-1]["train_loss"] < 0.1 * fitted.history[0]["train_loss"]


def test_ctx_log_refuses_a_non_scalar_tensor():
    class BadLog(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def step(self, ctx):
            pred = self.lin(ctx.input)
            ctx.log("per_sample", (pred - ctx.target) ** 2)

    with pytest.raises(ln.LanternaError, match=r"needs a scalar.*shape \(8, 1\).*value\.mean\(\)"):
        ln.setup(BadLog).fit((torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False)


def test_set_optimizers_leaving_parameters_out_warns_naming_them():
    class HeadOnly(TwoPart):
        def set_optimizers(self, lr=1e-3):
            return {"head": torch.optim.Adam(self.head.parameters(), lr=lr)}

    x = torch.randn(32, 3)
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) are in no optimizer.*body\.0\.weight, "
                                         r"body\.0\.bias.*set_optimizers"):
        ln.setup(HeadOnly, loss=nn.MSELoss()).fit((x, x[:, :1]), epochs=1, verbose=False)


def test_set_optimizers_with_a_parameter_in_two_optimizers_is_an_error():
    class Twice(GAN):
        def set_optimizers(self, lr=1e-3):
            return {"d": torch.optim.Adam(self.parameters(), lr=lr), "g": torch.optim.Adam(self.G.parameters())}

    with pytest.raises(ln.LanternaError, match=r"G\.0\.weight is in optimizers 'd' and 'g'.*Split"):
        ln.setup(Twice).fit(gaussian_data(64), epochs=1, verbose=False)


def test_step_optimizer_with_an_unknown_name_lists_the_names():
    class Typo(GAN):
        def step(self, ctx):
            loss = self.D(ctx.input).mean()
            ctx.backward(loss)
            ctx.step_optimizer("disc")

    with pytest.raises(ln.LanternaError, match=r"no optimizer 'disc'.*\['d', 'g'\]"):
        ln.setup(Typo).fit(gaussian_data(64), epochs=1, verbose=False)


# ---------------------------------------------------------------------------- schedulers and checkpoints


def _gan_callbacks():
    sched = torch.optim.lr_scheduler.ExponentialLR
    return [ln.callbacks.LRScheduler(sched, opt_name="d", gamma=0.5),
            ln.callbacks.LRScheduler(sched, opt_name="g", gamma=0.8)]


class CrashAt(ln.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, ctx: ln.Context) -> None:
        if ctx.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_schedulers_and_resume_cover_every_optimizer(tmp_path):
    """One LRScheduler per optimizer (opt_name=), both learning rates in history; a crashed GAN fit resumed by
    AutoResume ends with the weights, optimizer states and history of an uninterrupted run."""
    x = gaussian_data(256)
    opts = {"batch_size": 64}
    ref = ln.setup(GAN).fit(x, epochs=4, seed=3, verbose=False, dataloader_options=opts, callbacks=_gan_callbacks())
    assert [r["lr_d"] for r in ref.history] == pytest.approx([2e-3 * 0.5 ** e for e in range(4)])
    assert [r["lr_g"] for r in ref.history] == pytest.approx([2e-3 * 0.8 ** e for e in range(4)])

    resume = tmp_path / "resume"
    with pytest.raises(ln.CallbackError, match="simulated crash"):
        ln.setup(GAN).fit(x, epochs=4, seed=3, verbose=False, dataloader_options=opts,
                          callbacks=[*_gan_callbacks(), ln.callbacks.AutoResume(resume), CrashAt(3)])
    ckpts = sorted(resume.glob("*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], weights_only=True)
    assert set(state["optimizers"]) == {"d", "g"}
    again = ln.setup(GAN).fit(x, epochs=4, seed=3, verbose=False, dataloader_options=opts,
                              callbacks=[*_gan_callbacks(), ln.callbacks.AutoResume(resume)])
    for (name, a), b in zip(again.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), name
    for name in ("d", "g"):
        assert again.optimizers[name].param_groups[0]["lr"] == ref.optimizers[name].param_groups[0]["lr"]
    keys = ("train_d_loss", "train_g_loss", "lr_d", "lr_g")
    assert [[r[k] for k in keys] for r in again.history] == [[r[k] for k in keys] for r in ref.history]


# ---------------------------------------------------------------------------- several optimizers, default step


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.body(x))


class TwoOptimizers(TwoPart):
    def set_optimizers(self, lr=0.05):
        return {"body": torch.optim.SGD(self.body.parameters(), lr=lr, momentum=0.9),
                "head": torch.optim.SGD(self.head.parameters(), lr=lr * 2, momentum=0.9)}


class TwoGroups(TwoPart):
    def set_optimizers(self, lr=0.05):
        return torch.optim.SGD([{"params": self.body.parameters()},
                                {"params": self.head.parameters(), "lr": lr * 2}], lr=lr, momentum=0.9)


def test_several_optimizers_share_one_forward_pass_per_batch():
    """luz recomputes the forward pass per optimizer; lanterna runs one forward and one backward per batch
    and steps every optimizer — the same result as one optimizer with two parameter groups."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    a = ln.setup(TwoOptimizers, loss=nn.MSELoss()).fit((x, y), epochs=3, seed=3, verbose=False)
    b = ln.setup(TwoGroups, loss=nn.MSELoss()).fit((x, y), epochs=3, seed=3, verbose=False)
    n_batches = 7  # ceil(200 / 32)
    assert a.model.calls == 3 * n_batches
    assert set(a.optimizers) == {"body", "head"}
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------- gradient accumulation


def _linear_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-1.0], [0.5], [2.0]]) + 0.1 * torch.randn(n, 1, generator=g)


class CountSteps(ln.Callback):
    order = 150  # after GradientClip (100): sees the gradient the optimizer will use

    def __init__(self):
        self.before = self.after = 0
        self.grad_norms = []

    def on_train_batch_before_step(self, ctx):
        self.before += 1
        self.grad_norms.append(float(ctx.model.weight.grad.norm()))

    def on_train_batch_after_step(self, ctx):
        self.after += 1


def _sgd_linear():
    return ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
        in_features=4, out_features=1).set_opt_hparams(lr=0.1)


def test_accumulation_equals_one_large_batch():
    x, y = _linear_data()
    opts = {"batch_size": 8, "shuffle": False}
    counter = CountSteps()
    acc = _sgd_linear().fit((x, y), epochs=3, seed=0, verbose=False, dataloader_options=opts,
                            callbacks=[ln.callbacks.GradientAccumulation(4), counter])
    big = _sgd_linear().fit((x, y), epochs=3, seed=0, verbose=False,
                            dataloader_options={"batch_size": 32, "shuffle": False})
    for p, q in zip(acc.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert counter.before == counter.after == 3 * 3  # 12 batches per epoch → 3 steps per epoch
    # reported losses are the unscaled per-batch values: with one step at the end of the epoch, every batch
    # sees the initial weights, so the epoch's loss is the initial loss over the whole data
    first = _sgd_linear().fit((x, y), epochs=1, seed=0, verbose=False, dataloader_options=opts,
                              callbacks=[ln.callbacks.GradientAccumulation(96)])
    assert first.history[0]["train_loss"] == pytest.approx(_epoch_loss_at_init(x, y, seed=0), rel=1e-5)


def _epoch_loss_at_init(x, y, seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))


def test_accumulation_steps_a_short_last_group_with_its_own_average():
    x, y = _linear_data(80)  # 10 batches of 8 → groups of 4, 4, 2
    counter = CountSteps()
    acc = _sgd_linear().fit((x, y), epochs=1, seed=0, verbose=False, callbacks=[
        ln.callbacks.GradientAccumulation(4), counter], dataloader_options={"batch_size": 8, "shuffle": False})
    assert counter.before == 3
    torch.manual_seed(0)
    ref = nn.Linear(4, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for lo, hi in ((0, 32), (32, 64), (64, 80)):
        opt.zero_grad()
        F.mse_loss(ref(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
    for p, q in zip(acc.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class CountScalerUpdates(ln.Callback):
    def on_fit_begin(self, ctx):
        self.updates = 0
        if ctx.scaler is not None:
            update = ctx.scaler.update

            def counted(*args, **kwargs):
                self.updates += 1
                return update(*args, **kwargs)

            ctx.scaler.update = counted


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_accumulation_composes_with_clipping_and_mixed_precision(precision):
    x, y = _linear_data(128)
    counter, updates = CountSteps(), CountScalerUpdates()
    clip = ln.callbacks.GradientClip(max_norm=0.5)
    fitted = _sgd_linear().fit(
        (x, y), epochs=6, seed=0, verbose=False, dataloader_options={"batch_size": 8},
        accelerator=ln.Accelerator(device="cpu", precision=precision),
        callbacks=[ln.callbacks.GradientAccumulation(4), clip, counter, updates])
    assert counter.before == counter.after == 6 * 4
    assert fitted.history[-1]["train_loss"] < 0.5 * fitted.history[0]["train_loss"]
    # clipping acts on the accumulated (and, under 16-mixed, unscaled) gradient, once per step; the scaler
    # skips the first steps whose float16 gradients overflowed (inf/nan) and lowers its scale
    finite = [v for v in counter.grad_norms if v == v and v != float("inf")]
    assert len(counter.grad_norms) == 24 and len(finite) >= 20 and max(finite) <= 0.5 + 1e-6
    assert updates.updates == (24 if precision == "16-mixed" else 0)  # one scaler update per real step


def test_accumulation_with_a_custom_gan_step():
    x = gaussian_data(256)
    watch = WatchGeneratorStep()
    ln.setup(GAN).fit(x, epochs=2, verbose=False, dataloader_options={"batch_size": 32},
                      callbacks=[ln.callbacks.GradientAccumulation(2), watch])
    assert watch.g_steps == 2 * 4


def test_accumulation_refuses_a_bad_count():
    with pytest.raises(ln.LanternaError, match="positive integer"):
        ln.callbacks.GradientAccumulation(0)


def test_custom_step_sees_training_flag_and_validation():
    flags = []

    class Model(Net):
        def step(self, ctx):
            flags.append(ctx.training)
            pred = self(ctx.input)
            loss = nn.functional.mse_loss(pred, ctx.target)
            if ctx.training:
                ctx.opt.zero_grad()
                loss.backward()
                ctx.opt.step()
            ctx.pred = pred.detach()
            ctx.loss = loss.detach()

    x, y = make_luz_data(96)
    f = ln.setup(Model, metrics=[ln.metrics.MAE()]).set_opt_hparams(lr=0.01).fit(
        (x, y), epochs=3, valid_data=(x[:32], y[:32]), verbose=False)
    assert flags == ([True] * 3 + [False]) * 3
    assert history_keys(f.history[0]) == HISTORY_BASE | {"train_loss", "train_mae", "valid_loss", "valid_mae"}
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    with torch.no_grad():
        p = f.model(x[:32])
    assert f.history[-1]["valid_mae"] == pytest.approx(float((p - y[:32]).abs().mean()), rel=1e-5)


# ---------------------------------------------------------------------------- from issue 11


class TwoLossStep(nn.Module):
    """A custom step that reports its loss and a logged value."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def step(self, ctx):
        ctx.pred = self(ctx.input)
        ctx.loss = F.mse_loss(ctx.pred, ctx.target)
        ctx.log("l1", F.l1_loss(ctx.pred, ctx.target))
        if ctx.training:
            ctx.backward(ctx.loss)
            ctx.step_optimizer()


def test_evaluate_runs_the_modules_own_step_and_reports_its_logs():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    fitted = ln.setup(TwoLossStep).fit((x, y), epochs=1, verbose=False)
    before = [p.detach().clone() for p in fitted.model.parameters()]
    ev = fitted.evaluate((x, y), metrics=[ln.metrics.MAE()])
    with torch.no_grad():
        pred = fitted.model(x)
    assert ev["loss"] == pytest.approx(float(F.mse_loss(pred, y)), rel=1e-5)
    assert ev["l1"] == pytest.approx(float(F.l1_loss(pred, y)), rel=1e-5)
    assert ev["mae"] == pytest.approx(float(F.l1_loss(pred, y)), rel=1e-5)
    assert all(torch.equal(a, p) for a, p in zip(before, fitted.model.parameters()))

"""Mixup (luz's luz_callback_mixup + nn_mixup_loss): the weights of a seeded fit equal, bit for bit, those of a
hand-written loop that draws the same λ and permutation from torch's generator; validation uses the plain loss."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln
from lanterna.callbacks.mixup import MixupLoss


def _blobs(n=96, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2 * F.one_hot(y, d).float()
    return x, y


def _draw(n, alpha=0.4):
    """What Mixup draws for a batch of n, in its order: b ~ Beta(α, α) per sample, then the permutation."""
    a = torch.tensor(alpha)
    b = torch.distributions.Beta(a, a, validate_args=False).sample((n,))
    return torch.maximum(b, 1 - b), torch.randperm(n)


def _hand_mixup(model, x, y, *, loss, per_sample_loss, epochs, lr, valid, seed):
    """A plain loop: shuffled DataLoader, mixed input, λ·l(pred, y) + (1−λ)·l(pred, y[perm]) per sample."""
    torch.manual_seed(seed)
    dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    valid_losses = []
    for _ in range(epochs):
        model.train()
        for xb, yb in dl:
            lam, perm = _draw(len(xb))
            w = lam.view(-1, 1)
            pred = model(w * xb + (1 - w) * xb[perm])
            l1, l2 = loss(pred, yb), loss(pred, yb[perm])
            per_sample_loss(l1, l2, lam, yb, yb[perm]).backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():  # iterating the validation DataLoader draws its base seed, as fit's does
            (vx, vy), = list(valid)
            valid_losses.append(float(per_sample_loss.plain(model(vx), vy)))
    return valid_losses


class _Mean:
    def __init__(self, plain):
        self.plain = plain

    def __call__(self, l1, l2, lam, y1, y2):
        w = lam.view(-1, *([1] * (l1.dim() - 1)))
        return (w * l1 + (1 - w) * l2).mean()


class _ClassWeighted:
    def __init__(self, plain, weight):
        self.plain, self.weight = plain, weight

    def __call__(self, l1, l2, lam, y1, y2):
        return (lam * l1 + (1 - lam) * l2).sum() / (lam * self.weight[y1] + (1 - lam) * self.weight[y2]).sum()


_CLASS_W = torch.tensor([1.0, 3.0, 0.5])

CASES = {
    "cross_entropy": (lambda: nn.CrossEntropyLoss(), lambda p, t: F.cross_entropy(p, t, reduction="none"),
                      _Mean(nn.CrossEntropyLoss())),
    "class_weights": (lambda: nn.CrossEntropyLoss(weight=_CLASS_W),
                      lambda p, t: F.cross_entropy(p, t, weight=_CLASS_W, reduction="none"),
                      _ClassWeighted(nn.CrossEntropyLoss(weight=_CLASS_W), _CLASS_W)),
    "function": (lambda: F.cross_entropy, lambda p, t: F.cross_entropy(p, t, reduction="none"),
                 _Mean(nn.CrossEntropyLoss())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_seeded_fit_equals_a_hand_written_mixup_loop_bit_for_bit(case):
    make_loss, per_sample, combine = CASES[case]
    x, y = _blobs()
    valid_dl = DataLoader(TensorDataset(*_blobs(n=32, seed=1)), batch_size=32)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    fitted = ln.setup(model, loss=make_loss(), optimizer=torch.optim.Adam).set_opt_hparams(lr=0.05).fit(
        DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), epochs=3, valid_data=valid_dl,
        verbose=False, callbacks=[ln.callbacks.Mixup(alpha=0.4)])
    valid = _hand_mixup(reference, x, y, loss=per_sample, per_sample_loss=combine, epochs=3, lr=0.05,
                        valid=valid_dl, seed=123)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # validation is untouched: the plain loss of the epoch's weights on the validation set
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(valid, rel=1e-6)


def test_mixup_changes_training_is_reproducible_and_restores_the_loss():
    x, y = _blobs()
    setup = ln.setup(nn.Linear, loss=nn.CrossEntropyLoss()).set_hparams(in_features=4, out_features=3)
    plain = setup.fit((x, y), epochs=2, seed=0, verbose=False)
    mixed = setup.fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ln.callbacks.Mixup(0.4)])
    again = setup.fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ln.callbacks.Mixup(0.4)])
    assert not torch.equal(plain.model.weight, mixed.model.weight)
    torch.testing.assert_close(mixed.model.weight, again.model.weight, rtol=0, atol=0)  # seeded: reproducible
    # after fit the setup's own loss is back in place: evaluate uses the plain loss
    with torch.no_grad():
        plain_ce = float(F.cross_entropy(mixed.model(x), y))
    assert mixed.evaluate((x, y))["loss"] == pytest.approx(plain_ce, rel=1e-6)


def test_mixup_loss_with_lambda_one_is_the_wrapped_loss():
    pred, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 1, 0, -100, 2, 1])
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=_CLASS_W), nn.CrossEntropyLoss(reduction="sum")):
        mix = MixupLoss(loss)
        mix.lam, mix.perm = torch.ones(8), torch.randperm(8)
        torch.testing.assert_close(mix(pred, y), loss(pred, y))
    # elementwise losses on (N, k) targets: λ weighs each sample's row
    p, t = torch.randn(6, 2), torch.randn(6, 2)
    mix = MixupLoss(nn.MSELoss())
    lam, perm = torch.rand(6), torch.randperm(6)
    mix.lam, mix.perm = lam, perm
    w = lam.view(-1, 1)
    expected = (w * (p - t) ** 2 + (1 - w) * (p - t[perm]) ** 2).mean()
    torch.testing.assert_close(mix(p, t), expected)


def test_a_loss_without_per_sample_values_is_an_error_before_training():
    x, y = _blobs()
    seen = []

    class Spy(ln.Callback):
        def on_train_batch_begin(self, ctx):
            seen.append(ctx.iter)

    setup = ln.setup(nn.Linear, loss=lambda p, t: F.cross_entropy(p, t)).set_hparams(in_features=4, out_features=3)
    with pytest.raises(ln.LanternaError, match="reduction='none'"):
        setup.fit((x, y), epochs=1, verbose=False, callbacks=[ln.callbacks.Mixup(), Spy()])
    assert seen == []


def test_bad_alpha_and_integer_inputs_are_clear_errors():
    for alpha in (0, -1, True, "0.4"):
        with pytest.raises(ln.LanternaError, match="alpha"):
            ln.callbacks.Mixup(alpha)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randint(0, 10, (32, 2)), torch.randint(0, 3, (32,))
    with pytest.raises(ln.LanternaError, match="floating-point"):
        ln.setup(emb, loss=nn.CrossEntropyLoss()).fit((x, y), epochs=1, verbose=False,
                                                     callbacks=[ln.callbacks.Mixup()])


def test_a_module_with_its_own_step_is_refused():
    class Own(nn.Linear):
        def step(self, ctx):
            pass

    with pytest.raises(ln.LanternaError, match="own step"):
        ln.setup(Own(4, 3), loss=nn.CrossEntropyLoss()).fit(_blobs(), epochs=1, verbose=False,
                                                           callbacks=[ln.callbacks.Mixup()])


READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _host_reads(run):
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        run()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return counts


def test_mixup_adds_no_host_read_per_batch():
    x, y = _blobs(n=256)
    setup = ln.setup(nn.Linear, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD).set_hparams(
        in_features=4, out_features=3)

    def run(batches):
        return lambda: setup.fit((x, y), epochs=2, valid_data=(x[:64], y[:64]), verbose=False, seed=0,
                                 dataloader_options={"batch_size": 256 // batches},
                                 callbacks=[ln.callbacks.Mixup(), ln.callbacks.TerminateOnNaN(enabled=False)])

    assert _host_reads(run(16)) == _host_reads(run(4))

"""Fault tables: signals (SIGINT during fit returns the Fitted so far; SIGTERM with AutoResume writes a
checkpoint and exits 143; handlers restored afterwards) and numerics (NaN loss, NaN/Inf gradient with a
finite loss, Inf inputs, a huge learning rate). Signals are sent by the process to itself from a callback,
at an exact batch, inside a child forked from this warm process."""

from __future__ import annotations

import functools
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import CORRECT, Env, Lost, Row, Wrong, check_row, expect, forked, params, same_state
from shared import InfGrad, NaNGrad, Net, data, fit, logger_cls, state_of
from torch import nn

import lanterna as ln
from lanterna.io import load_checkpoint

GROUPS = {"sig": "signals", "num": "numerics"}
cb = ln.callbacks
VALID = {"valid_data": (data(16, seed=3))}


def group_of(row: Row) -> str:
    return GROUPS[row.id.split("-", 1)[0]]


class At(ln.Callback):
    """Run ``action(ctx)`` at ``hook`` of epoch ``epoch``, batch ``batch`` (once)."""

    def __init__(self, hook: str, epoch: int, batch: int, action: Any) -> None:
        self.hook, self.epoch, self.batch, self.action, self.done = hook, epoch, batch, action, False

    def _fire(self, hook: str, ctx: Any) -> None:
        if hook == self.hook and not self.done and ctx.epoch == self.epoch and ctx.iter == self.batch:
            self.done = True
            self.action(ctx)

    def on_train_batch_begin(self, ctx: Any) -> None:
        self._fire("on_train_batch_begin", ctx)

    def on_train_batch_end(self, ctx: Any) -> None:
        self._fire("on_train_batch_end", ctx)

    def on_valid_batch_end(self, ctx: Any) -> None:
        self._fire("on_valid_batch_end", ctx)


def send(sig: int, times: int = 1) -> Any:
    def action(ctx: Any) -> None:
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return action


def stop(ctx: Any) -> None:
    raise ln.StopTraining()


def digest(state: dict[str, torch.Tensor]) -> list[float]:
    return [float(v.double().sum()) for v in state.values()]


# ---------------------------------------------------------------------------- signals


def sigint(hook: str, epoch: int, batch: int, **kw: Any) -> Any:
    """Ctrl-C at an exact batch: fit returns the Fitted so far (status "interrupted"), whose weights are those
    after the current batch — the same as stopping there with StopTraining."""
    def child() -> dict[str, Any]:
        f = fit(epochs=3, callbacks=[At(hook, epoch, batch, send(signal.SIGINT))], **kw)
        ref = fit(epochs=3, callbacks=[At(hook, epoch, batch, stop)], **kw)
        return {"status": f.status, "epochs": len(f.history), "same": same_state(state_of(f), state_of(ref)),
                "ref_epochs": len(ref.history)}

    def run(env: Env) -> None:
        out = forked(child).reraise()
        expect(out["status"] == "interrupted", f"status {out['status']!r} after Ctrl-C")
        expect(out["epochs"] == out["ref_epochs"], f"history has {out['epochs']} epochs")
        expect(out["same"], "the weights are not those after the interrupted batch")
    return run


def sigint_twice(env: Env) -> None:
    """A second Ctrl-C aborts (KeyboardInterrupt), as documented."""
    def child() -> str:
        try:
            fit(epochs=3, callbacks=[At("on_train_batch_end", 1, 2, send(signal.SIGINT, 2))])
        except KeyboardInterrupt:
            return "KeyboardInterrupt"
        return "returned"

    got = forked(child).reraise()
    expect(got == "KeyboardInterrupt", f"the second Ctrl-C did not abort ({got})")


@functools.cache
def reference(valid: bool) -> list[float]:
    return digest(state_of(fit(epochs=3, **(VALID if valid else {}))))


def resume_ok(folder: Path, valid: bool) -> None:
    files = sorted(folder.glob("resume-*.pt")) if folder.exists() else []
    if not files:
        raise Lost(f"no resume checkpoint was kept in {folder.name}")
    try:
        load_checkpoint(files[-1])
    except ln.LanternaError as e:
        raise Lost(f"the kept checkpoint does not load: {e}") from None
    final = fit(epochs=3, callbacks=[cb.AutoResume(folder)], **(VALID if valid else {}))
    expect(digest(state_of(final)) == reference(valid), "the resumed run ended with other weights than an "
           "uninterrupted one")


def sigint_autoresume(env: Env) -> None:
    folder = env.tmp / "state"

    def child() -> str:
        return fit(epochs=3, callbacks=[cb.AutoResume(folder), At("on_train_batch_end", 2, 2,
                                                                  send(signal.SIGINT))]).status

    status = forked(child).reraise()
    expect(status == "interrupted", f"status {status!r}")
    resume_ok(folder, False)


def sigint_keepbest(env: Env) -> None:
    def child() -> bool:
        kb = cb.KeepBestModel(monitor="train_loss")
        f = fit(epochs=4, callbacks=[kb, At("on_train_batch_end", 3, 2, send(signal.SIGINT))])
        return kb.best_state is not None and same_state(state_of(f), kb.best_state)

    expect(forked(child).reraise(), "after Ctrl-C the model is not the best epoch's")


def sigterm(hook: str, epoch: int, batch: int, valid: bool) -> Any:
    """SIGTERM with AutoResume: the current step finishes, a checkpoint is written, exit status 143; the same
    command run again resumes and ends bit-identical to an uninterrupted run."""
    def run(env: Env) -> None:
        folder = env.tmp / "state"
        kw = VALID if valid else {}
        child = forked(lambda: fit(epochs=3, callbacks=[cb.AutoResume(folder),
                                                         At(hook, epoch, batch, send(signal.SIGTERM))], **kw).status)
        expect(child.status == "exit", f"the child died of signal {child.sig}")
        expect(child.code == 143, f"exit status {child.code} (value {child.value!r}, error {child.error})")
        resume_ok(folder, valid)
    return run


def sigterm_handler_restored(env: Env) -> None:
    """After a fit with AutoResume ends, SIGTERM is back to what it was (here: the default, which kills)."""
    def child() -> str:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fit(epochs=1, callbacks=[cb.AutoResume(env.tmp / "state")])
        os.kill(os.getpid(), signal.SIGTERM)
        return "survived SIGTERM"

    out = forked(child)
    expect(out.status == "signal" and out.sig == signal.SIGTERM, f"after fit, SIGTERM: {out.status} {out.value}")


def sigint_handler_restored(env: Env) -> None:
    def child() -> str:
        fit(epochs=1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                pass
        except KeyboardInterrupt:
            return "KeyboardInterrupt"
        return "ignored"

    got = forked(child).reraise()
    expect(got == "KeyboardInterrupt", f"after fit, Ctrl-C was {got}")


# ---------------------------------------------------------------------------- numerics


def poison(ctx: Any) -> None:
    ctx.target = ctx.target * float("nan")


def nonfinite(make: Any, *, epochs: int = 3, expect_epochs: int | None = None) -> Any:
    """A non-finite loss or gradient: NonFiniteLossError before the step, carrying ``.fitted`` whose weights are
    finite (those of the last good step) and whose history holds the completed epochs."""
    def run(env: Env) -> None:
        try:
            f = make(epochs)
        except ln.NonFiniteLossError as e:
            got = getattr(e, "fitted", None)
            expect(got is not None, "the NonFiniteLossError carries no .fitted")
            bad = [k for k, v in got.model.state_dict().items() if not torch.isfinite(v).all()]
            expect(not bad, f"the .fitted weights are not finite: {bad}")
            if expect_epochs is not None:
                expect(len(got.history) == expect_epochs, f".fitted has {len(got.history)} epochs of history")
            raise
        bad = [k for k, v in f.model.state_dict().items() if not torch.isfinite(v).all()]
        raise Wrong(f"fit returned without an error; non-finite weights: {bad or 'none'}; last train_loss "
                    f"{f.history[-1].get('train_loss') if f.history else None}")
    return run


def nan_at(epoch: int, batch: int) -> Any:
    return lambda epochs: fit(epochs=epochs, callbacks=[At("on_train_batch_begin", epoch, batch, poison)])


def module_fit(cls: type[nn.Module], **opt: Any) -> Any:
    return lambda epochs: fit(ln.setup(cls, loss=nn.MSELoss()).set_opt_hparams(lr=0.01, **opt), epochs=epochs)


def nan_grad_clipped(epochs: int) -> Any:
    return fit(ln.setup(NaNGrad, loss=nn.MSELoss()), epochs=epochs, callbacks=[cb.GradientClip(1.0)])


def inf_inputs(epochs: int) -> Any:
    x, y = data()
    x[5] = float("inf")
    return fit(train=(x, y), epochs=epochs, dataloader_options={"batch_size": 16})


def huge_lr(epochs: int) -> Any:
    setup = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(d_in=3, d_hidden=8, d_out=1)
    return fit(setup.set_opt_hparams(lr=1e25), epochs=epochs)


def custom_step_nan(epochs: int) -> Any:
    x, y = data()
    y[:] = float("nan")
    return ln.setup(logger_cls("aux")).fit((x, y), epochs=epochs, verbose=False)


def nan_first_batch(env: Env) -> None:
    """NaN at the very first batch: .fitted has no history and the initial weights."""
    try:
        fit(epochs=2, callbacks=[At("on_train_batch_begin", 1, 1, poison)])
    except ln.NonFiniteLossError as e:
        got = getattr(e, "fitted", None)
        expect(got is not None and got.history == [], "no .fitted with an empty history")
        raise
    raise Wrong("fit returned without an error")


def nan_keeps_resume_state(env: Env) -> None:
    folder = env.tmp / "state"
    try:
        fit(epochs=3, callbacks=[cb.AutoResume(folder), At("on_train_batch_begin", 2, 2, poison)])
    finally:
        files = sorted(folder.glob("resume-*.pt")) if folder.exists() else []
        if not files:
            raise Lost("the NaN stop removed the resume state")


def disabled(env: Env) -> None:
    """TerminateOnNaN(enabled=False): the user opted out; training goes on and the loss is NaN in history."""
    f = fit(epochs=2, callbacks=[cb.TerminateOnNaN(enabled=False), At("on_train_batch_begin", 1, 1, poison)])
    expect(len(f.history) == 2, f"history {len(f.history)} epochs")
    expect(math.isnan(f.history[0]["train_loss"]), "the NaN of epoch 1 is not in history")


def rows() -> list[Row]:
    R: list[Row] = []

    def row(id: str, run: Any, names: tuple[str, ...] = (), area: str = "", **kw: Any) -> None:
        R.append(Row(id, run, tuple(names), area=area or id.split("-")[1], **kw))

    # -------------------------------------------------------------- signals
    row("sig-sigint-train-batch", sigint("on_train_batch_end", 2, 2), expect=CORRECT, area="sigint")
    row("sig-sigint-first-batch", sigint("on_train_batch_end", 1, 1), expect=CORRECT, area="sigint")
    row("sig-sigint-validation", sigint("on_valid_batch_end", 2, 1, **VALID), expect=CORRECT, area="sigint")
    row("sig-sigint-twice-aborts", sigint_twice, expect=CORRECT, area="sigint")
    row("sig-sigint-autoresume-keeps-state", sigint_autoresume, expect=CORRECT, area="sigint")
    row("sig-sigint-keepbest-restores-best", sigint_keepbest, expect=CORRECT, area="sigint")
    row("sig-sigint-handler-restored", sigint_handler_restored, expect=CORRECT, area="sigint")
    row("sig-sigterm-autoresume-mid-epoch", sigterm("on_train_batch_end", 2, 2, False), expect=CORRECT,
        area="sigterm")
    row("sig-sigterm-autoresume-last-batch", sigterm("on_train_batch_end", 2, 4, False), expect=CORRECT,
        area="sigterm")
    row("sig-sigterm-autoresume-validation", sigterm("on_valid_batch_end", 2, 1, True), expect=CORRECT,
        area="sigterm")
    row("sig-sigterm-autoresume-first-batch", sigterm("on_train_batch_end", 1, 1, False), expect=CORRECT,
        area="sigterm")
    row("sig-sigterm-handler-restored", sigterm_handler_restored, expect=CORRECT, area="sigterm")
    # -------------------------------------------------------------- numerics
    row("num-nan-loss-mid-fit", nonfinite(nan_at(2, 2), expect_epochs=1), ("nan", "epoch 2"), area="nan loss")
    row("num-nan-loss-first-batch", nan_first_batch, ("nan",), area="nan loss")
    row("num-nan-loss-custom-step", nonfinite(custom_step_nan), ("nan",), area="nan loss")
    row("num-nan-loss-keeps-resume-state", nan_keeps_resume_state, ("nan",), area="nan loss")
    row("num-nan-gradient-finite-loss", nonfinite(module_fit(NaNGrad), expect_epochs=0), ("nan", "grad"),
        area="nan gradient")
    row("num-nan-gradient-clipped", nonfinite(nan_grad_clipped, expect_epochs=0), ("nan", "grad"),
        area="nan gradient")
    row("num-inf-gradient-finite-loss", nonfinite(module_fit(InfGrad), expect_epochs=0), ("inf", "grad"),
        area="nan gradient")
    row("num-inf-inputs", nonfinite(inf_inputs), ("epoch",), area="inf inputs")
    row("num-huge-lr", nonfinite(huge_lr), ("loss",), area="huge lr")
    row("num-terminate-on-nan-disabled", disabled, expect=CORRECT, area="nan loss")
    return R


ROWS = rows()


@pytest.mark.parametrize("row", params(ROWS))
def test_signals_numerics(row: Row) -> None:
    check_row(group_of(row), row)

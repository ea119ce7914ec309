"""Fault table: persistence (issue #11) — kill -9 at seeded moments of ``fitted.save`` and of checkpoint
writes (children forked from this warm process), full disks (a tiny tmpfs where root may mount one,
RLIMIT_FSIZE with SIGXFSZ ignored otherwise), damaged files (truncation, byte flips, zero fill, missing or
foreign metadata), read-only and odd paths, and the round trips the contract promises.

Moments of a kill: "event k" is just before the k-th file-system operation (Python audit events: open,
rename, remove, mkdir ...) under the case's folder, with k drawn (seeded) from the operations a dry run
counted; "byte b" is the moment a file would grow past b bytes (RLIMIT_FSIZE, SIGXFSZ left deadly)."""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    CORRECT,
    OK,
    Env,
    Lost,
    Row,
    Wrong,
    check_row,
    expect,
    fill,
    forked,
    one_line,
    params,
    read_only_folder,
    same_state,
    scratch,
    tiny_disk,
)
from shared import (
    QUIET,
    Act,
    Net,
    ar_fit,
    ar_template,
    data,
    edit_meta,
    fit,
    fitted_a,
    fitted_b,
    mc_fit,
    meta_file,
    reg_setup,
    saved_checkpoint,
    state_of,
    weights_file,
)

import lanterna as ln
from lanterna.io import load_checkpoint

GROUP = "persistence"
cb = ln.callbacks
SCRATCH = scratch("lanterna-rel-persist-")
TEMP_HINTS = (".lanterna-tmp-", ".tmp", "~", ".partial", ".staging")


def _temps(folder: Path) -> list[str]:
    """Temp files and folders left in ``folder`` (names lanterna's writers or common ones use)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if any(h in p.name for h in TEMP_HINTS) or (p.name.startswith(".") and p.name != ".probe"))


def no_temps(folder: Path) -> None:
    left = _temps(folder)
    expect(not left, f"temp files left behind: {left}")


# ---------------------------------------------------------------------------- models A (previous) and B (new)


@functools.cache
def states() -> dict[str, Any]:
    return {"A": state_of(fitted_a()), "B": state_of(fitted_b()), "A_len": len(fitted_a().history),
            "B_len": len(fitted_b().history)}


def which(path: Path) -> str:
    """"A" or "B" when ``path`` loads as one of them whole; raises Lost / Wrong otherwise."""
    try:
        f = ln.load(path, module=Net)
    except ln.LanternaError as e:  # refused as damaged (a raw exception is lanterna's bug: it propagates)
        raise Lost(f"{path.name} no longer loads: {one_line(e)}") from None
    s = states()
    st = state_of(f)
    w = "A" if same_state(st, s["A"]) else "B" if same_state(st, s["B"]) else "?"
    h = "A" if len(f.history) == s["A_len"] else "B" if len(f.history) == s["B_len"] else "?"
    expect(w == h and w != "?", f"{path.name} loads as a mix: weights of {w}, metadata (history) of {h}")
    return w


def ckpt_which(path: Path, refs: dict[str, dict[str, torch.Tensor]]) -> str:
    try:
        state = load_checkpoint(path)
    except ln.LanternaError as e:
        raise Lost(f"checkpoint {path.name} no longer loads: {one_line(e)}") from None
    for name, ref in refs.items():
        if same_state(state["model"], ref):
            return name
    raise Wrong(f"checkpoint {path.name} holds weights of neither the previous nor the new epoch")


# ---------------------------------------------------------------------------- kill -9 during fitted.save


def _moment(kind: str, i: int, n: int) -> int:
    """The i-th seeded moment out of ``n``: a seeded permutation, so that rows cover distinct moments (all
    of them when there are more rows than moments)."""
    n = max(n, 1)
    picks = random.Random(f"lanterna-{kind}").sample(range(n), min(n, 64))
    return picks[i % len(picks)]


@functools.cache
def _save_profile(suffix: str) -> tuple[int, int]:
    """(file operations, largest file size) of saving B over A, counted in a forked dry run."""
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    p = folder / f"model{suffix}"
    fitted_a().save(p)
    child = forked(lambda: str(fitted_b().save(p)), fs_root=folder)
    child.reraise()
    sizes = [q.stat().st_size for q in folder.rglob("*") if q.is_file()]
    return child.events, max(sizes)


def save_kill(kind: str, i: int, suffix: str = "") -> Any:
    def run(env: Env) -> None:
        p = env.tmp / f"model{suffix}"
        fitted_a().save(p)
        n_events, size = _save_profile(suffix)
        if kind == "event":
            k = _moment(f"save{suffix}-event", i, n_events)
            child = forked(lambda: str(fitted_b().save(p)), fs_root=env.tmp, kill_at_event=k)
            env.notes.append(f"killed before file operation {k} of {n_events}")
        else:
            b = _moment(f"save{suffix}-byte", i, size)
            child = forked(lambda: str(fitted_b().save(p)), fsize=b, kill_on_fsize=True)
            env.notes.append(f"killed at byte {b} of {size}")
        expect(child.status != "hang", "the save hung")
        got = which(p)
        env.notes.append(f"child {child.status}, the path holds {got}")
        if child.status == "exit":
            expect(got == "B", "the save finished but the path holds the previous model")
        try:  # the next save (killed writes' leftovers swept) works
            fitted_b().save(p)
        except Exception as e:  # noqa: BLE001
            raise Wrong(f"saving again after the kill failed: {one_line(e)}") from None
        expect(which(p) == "B", "saving again after the kill did not store the new model")
        left = _temps(env.tmp)
        if left:  # not classified: the contract promises A or B after a kill, not the sweeping of its debris
            env.notes.append(f"left behind after the next save: {left}")
    return run


# ---------------------------------------------------------------------------- kill -9 during checkpoint writes


@functools.cache
def _mc_refs() -> dict[str, dict[str, torch.Tensor]]:
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    return {"previous": state_of(mc_fit(folder / "a.pt", 0)), "new": state_of(mc_fit(folder / "b.pt", 1))}


@functools.cache
def _mc_profile() -> tuple[int, int]:
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    mc_fit(folder / "last.pt", 0)
    child = forked(lambda: bool(mc_fit(folder / "last.pt", 1)), fs_root=folder)
    child.reraise()
    return child.events, (folder / "last.pt").stat().st_size


def ckpt_kill(kind: str, i: int) -> Any:
    def run(env: Env) -> None:
        p = env.tmp / "last.pt"
        mc_fit(p, 0)
        refs = _mc_refs()
        n_events, size = _mc_profile()
        if kind == "event":
            k = _moment("ckpt-event", i, n_events)
            child = forked(lambda: bool(mc_fit(p, 1)), fs_root=env.tmp, kill_at_event=k)
            env.notes.append(f"killed before file operation {k} of {n_events}")
        else:
            b = _moment("ckpt-byte", i, size)
            child = forked(lambda: bool(mc_fit(p, 1)), fsize=b, kill_on_fsize=True)
            env.notes.append(f"killed at byte {b} of {size}")
        expect(child.status != "hang", "the fit hung")
        got = ckpt_which(p, refs)
        if child.status == "exit":
            expect(got == "new", "the fit finished but the checkpoint holds the previous epoch")
        mc_fit(p, 1)  # the next run sweeps what the kill left and writes again
        expect(ckpt_which(p, refs) == "new", "the next run did not write its checkpoint")
        no_temps(env.tmp)
    return run


@functools.cache
def _ar_reference() -> dict[str, torch.Tensor]:
    return state_of(fit(epochs=3))


@functools.cache
def _ar_profile() -> int:
    folder = Path(tempfile.mkdtemp(dir=SCRATCH)) / "state"
    shutil.copytree(ar_template(), folder)
    child = forked(lambda: bool(ar_fit(folder)), fs_root=folder.parent)
    child.reraise()
    return child.events


def _resumable(folder: Path) -> None:
    """Raise Lost when the folder has checkpoints but none of them is whole."""
    files = sorted(folder.glob("resume-*.pt")) if folder.exists() else []
    whole = []
    for f in files:
        try:
            load_checkpoint(f)
            whole.append(f.name)
        except Exception:  # noqa: BLE001, S112
            continue
    if files and not whole:
        raise Lost(f"no whole checkpoint left among {[f.name for f in files]}")


def ar_kill(i: int) -> Any:
    def run(env: Env) -> None:
        folder = env.tmp / "state"
        shutil.copytree(ar_template(), folder)
        n = _ar_profile()
        k = _moment("autoresume-event", i, n)
        child = forked(lambda: bool(ar_fit(folder)), fs_root=env.tmp, kill_at_event=k)
        env.notes.append(f"killed before file operation {k} of {n} ({child.status})")
        expect(child.status != "hang", "the fit hung")
        _resumable(folder)
        final = ar_fit(folder)
        expect(same_state(state_of(final), _ar_reference()), "the resumed run ended with other weights than an "
               "uninterrupted run")
    return run


# ---------------------------------------------------------------------------- full disks


def _enospc_or_efbig(env: Env, prepare: Any, op: Any, verify: Any, size: str = "256k") -> None:
    """``prepare(folder)`` writes the previous state, then ``op(folder)`` runs on a full disk (ENOSPC on a tiny
    tmpfs) or, where none can be mounted, in a child whose files may not grow (EFBIG); ``verify(folder, ok)``
    checks the files afterwards (ok: whether op succeeded)."""
    with tiny_disk(env.tmp / "disk", size) as disk:
        if disk is None:
            return _efbig(env, prepare, op, verify)
        prepare(disk)
        fill(disk)
        error: BaseException | None = None
        try:
            op(disk)
        except Exception as e:  # noqa: BLE001 - classified after the file checks
            error = e
        (disk / "filler.bin").unlink()
        _verify(disk, error is None, verify, one_line(error) if error else "no error")
        if error is not None:
            raise error
    return None


def _verify(folder: Path, ok: bool, verify: Any, what: str) -> None:
    try:
        verify(folder, ok)
        no_temps(folder)
    except Wrong as e:
        raise Wrong(f"{e} (the operation: {what})") from None
    except Lost as e:
        raise Lost(f"{e} (the operation: {what})") from None


def _efbig(env: Env, prepare: Any, op: Any, verify: Any, limit: int = 256) -> None:
    folder = env.tmp / "disk"
    folder.mkdir(exist_ok=True)
    prepare(folder)
    child = forked(lambda: bool(op(folder)), fsize=limit)
    ok = child.status == "exit" and child.error is None
    _verify(folder, ok, verify, "no error" if ok else str(child.error or child.status)[:200])
    child.reraise()


def _keeps_model(name: str) -> Any:
    def verify(folder: Path, ok: bool) -> None:
        got = which(folder / name)
        expect(got == ("B" if ok else "A"), f"{name} holds {got} after a {'successful' if ok else 'failed'} save")
    return verify


def full_save(name: str, efbig: bool = False) -> Any:
    def prepare(folder: Path) -> None:
        fitted_a().save(folder / name)

    def op(folder: Path) -> Any:
        return fitted_b().save(folder / name)

    def run(env: Env) -> None:
        (_efbig if efbig else _enospc_or_efbig)(env, prepare, op, _keeps_model(name))
    return run


def full_ckpt(efbig: bool = False) -> Any:
    refs: dict[str, Any] = {}

    def prepare(folder: Path) -> None:
        refs.update(_mc_refs())
        mc_fit(folder / "last.pt", 0)

    def op(folder: Path) -> Any:
        return mc_fit(folder / "last.pt", 1)

    def verify(folder: Path, ok: bool) -> None:
        got = ckpt_which(folder / "last.pt", refs)
        expect(got == ("new" if ok else "previous"), f"the checkpoint holds the {got} epoch")

    def run(env: Env) -> None:
        (_efbig if efbig else _enospc_or_efbig)(env, prepare, op, verify)
    return run


def full_autoresume(efbig: bool = False) -> Any:
    def prepare(folder: Path) -> None:
        shutil.copytree(ar_template(), folder / "state")

    def op(folder: Path) -> Any:
        return ar_fit(folder / "state")

    def verify(folder: Path, ok: bool) -> None:
        if not ok:
            _resumable(folder / "state")
            expect(any(folder.glob("state/resume-epoch-0002.pt")), "the epoch-2 checkpoint is gone")

    def run(env: Env) -> None:
        (_efbig if efbig else _enospc_or_efbig)(env, prepare, op, verify)
    return run


def full_csv(efbig: bool = False) -> Any:
    def op(folder: Path) -> Any:
        return fit(epochs=2, callbacks=[cb.CSVLogger(folder / "log.csv")])

    def run(env: Env) -> None:
        if efbig:
            _efbig(env, lambda f: None, op, lambda f, ok: None, limit=64)
        else:
            _enospc_or_efbig(env, lambda f: None, op, lambda f, ok: None)
    return run


# ---------------------------------------------------------------------------- damaged saved models


def _saved(env: Env, name: str = "model") -> Path:
    return fitted_a().save(env.tmp / name)


def _load_check(p: Path, module: Any = Net) -> None:
    f = ln.load(p, module=module)
    expect(same_state(state_of(f), states()["A"]), "loaded other weights than were saved, without an error")


def damaged(mutate: Any, name: str = "model", module: Any = Net) -> Any:
    def run(env: Env) -> None:
        p = _saved(env, name)
        env.vars["weights"] = _weights(p).name
        mutate(p)
        _load_check(p, module)
    return run


_weights, _meta = weights_file, meta_file


def truncate(frac: float | int) -> Any:
    def mutate(p: Path) -> None:
        w = _weights(p)
        b = w.read_bytes()
        w.write_bytes(b[: int(len(b) * frac)] if isinstance(frac, float) else b[:frac])
    return mutate


def flip(offset: int) -> Any:
    def mutate(p: Path) -> None:
        w = _weights(p)
        b = bytearray(w.read_bytes())
        b[offset] ^= 0x01
        w.write_bytes(bytes(b))
    return mutate


def flip_in_header(needle: bytes, at: int) -> Any:
    """Change one character of the safetensors header: ``at`` bytes into the last occurrence of ``needle``."""
    def mutate(p: Path) -> None:
        w = _weights(p)
        b = bytearray(w.read_bytes())
        i = bytes(b).rfind(needle)
        assert i >= 0, needle
        b[i + at] = ord("9") if b[i + at] != ord("9") else ord("7")
        w.write_bytes(bytes(b))
    return mutate


def zero_data(p: Path) -> None:
    w = _weights(p)
    b = w.read_bytes()
    n = int.from_bytes(b[:8], "little")
    w.write_bytes(b[: 8 + n] + bytes(len(b) - 8 - n))


def zero_all(p: Path) -> None:
    w = _weights(p)
    w.write_bytes(bytes(w.stat().st_size))


def edit_json(change: Any) -> Any:
    return lambda p: edit_meta(p, change)


def write_meta(text: str | bytes) -> Any:
    def mutate(p: Path) -> None:
        (_meta(p).write_bytes if isinstance(text, bytes) else _meta(p).write_text)(text)  # type: ignore[operator]
    return mutate


def mix(p: Path) -> None:
    """The weights of B under the metadata of A (what a non-atomic save leaves)."""
    other = fitted_b().save(p.parent / "other")
    shutil.copyfile(_weights(other), _weights(p))


def plain_safetensors(env: Env) -> None:
    from safetensors.torch import save_file

    save_file(fitted_a().model.state_dict(), str(env.tmp / "plain.safetensors"))
    ln.load(env.tmp / "plain.safetensors", module=Net)


def hf_folder(env: Env) -> None:
    from safetensors.torch import save_file

    (env.tmp / "hf").mkdir()
    save_file(fitted_a().model.state_dict(), str(env.tmp / "hf" / "model.safetensors"))
    (env.tmp / "hf" / "config.json").write_text('{"model_type": "bert"}')
    ln.load(env.tmp / "hf", module=Net)


# ---------------------------------------------------------------------------- damaged checkpoints


def ckpt_damaged(mutate: Any, reader: str = "load_checkpoint") -> Any:
    def run(env: Env) -> None:
        p = saved_checkpoint(env)
        mutate(p)
        if reader == "ln.load":
            f = ln.load(p, module=Net)
            expect(same_state(state_of(f), _mc_refs()["previous"]), "ln.load read damaged weights silently")
        else:
            state = load_checkpoint(p)
            expect(same_state(state["model"], _mc_refs()["previous"]), "a damaged checkpoint loaded silently")
    return run


def ckpt_flip_tensor(p: Path) -> None:
    """Flip a bit inside the bytes of the first weight tensor (found in the archive's data records)."""
    import zipfile

    raw = bytearray(p.read_bytes())
    target = _mc_refs()["previous"]["net.0.weight"].numpy().tobytes()
    i = raw.find(target)
    if i < 0:  # stored compressed or elsewhere: flip inside the first data record instead
        with zipfile.ZipFile(p) as z:
            info = next(x for x in z.infolist() if "/data/" in x.filename)
        i = info.header_offset + 30 + len(info.filename) + len(info.extra) + 4
    raw[i + 5] ^= 0x10
    p.write_bytes(bytes(raw))


def ckpt_foreign(p: Path) -> None:
    torch.save({"model": _mc_refs()["previous"], "epoch": 1}, p)


def ckpt_newer(p: Path) -> None:
    state = torch.load(p, weights_only=True)
    state["format_version"] = 99
    torch.save(state, p)


def ckpt_ln_load(env: Env) -> None:
    p = saved_checkpoint(env)
    f = ln.load(p, module=Net)
    expect(same_state(state_of(f), _mc_refs()["previous"]), "ln.load(checkpoint) loaded other weights")
    x, _ = data()
    expect(torch.equal(f.predict(x), f.model(x).detach()), "the loaded checkpoint does not predict")


def ar_damaged(which_files: str) -> Any:
    """Damage the newest (or every) checkpoint of a crashed AutoResume run; the next run resumes from a whole
    one (or starts afresh) with a warning, and ends as an uninterrupted run."""
    def run(env: Env) -> None:
        folder = env.tmp / "state"
        shutil.copytree(ar_template(), folder)
        files = sorted(folder.glob("resume-*.pt"))
        for f in files if which_files == "all" else files[-1:]:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            final = ar_fit(folder)
        expect(any("damaged" in str(w.message).lower() or "cannot be read" in str(w.message).lower()
                   for w in caught), "no warning about the damaged checkpoint")
        expect(same_state(state_of(final), _ar_reference()), "the run after the damage ended with other weights")
    return run


def ar_changed(**change: Any) -> Any:
    def run(env: Env) -> None:
        folder = env.tmp / "state"
        shutil.copytree(ar_template(), folder)
        setup = reg_setup()
        if "optimizer" in change:
            setup = ln.setup(Net, loss=setup.loss, optimizer=change["optimizer"], metrics=setup.metrics
                             ).set_hparams(**setup.hparams).set_opt_hparams(lr=0.01)
        if "hparams" in change:
            setup = setup.set_hparams(**change["hparams"])
        train = data(48, seed=9) if "data" in change else None
        fit(setup, train=train, epochs=3, callbacks=[cb.AutoResume(folder)],
            **({"dataloader_options": {"batch_size": 16}} if train is not None else {}))
    return run


def ar_newer(env: Env) -> None:
    folder = env.tmp / "state"
    shutil.copytree(ar_template(), folder)
    newest = sorted(folder.glob("resume-*.pt"))[-1]
    ckpt_newer(newest)
    ar_fit(folder)


# ---------------------------------------------------------------------------- read-only and odd paths


def readonly(op: str) -> Any:
    def run(env: Env) -> None:
        ro = env.tmp / "ro"
        prepare = (lambda f: fitted_a().save(f / "model")) if op in ("save-over", "load") else None
        with read_only_folder(ro, prepare):
            if op == "save-over":
                try:
                    fitted_b().save(ro / "model")
                finally:
                    which(ro / "model")
            elif op == "save-new":
                fitted_b().save(ro / "new")
            elif op == "save-file":
                fitted_b().save(ro / "new.safetensors")
            elif op == "load":
                expect(which(ro / "model") == "A", "the read-only model did not load")
            elif op == "checkpoint":
                fit(callbacks=[cb.ModelCheckpoint(ro / "ck/")], valid_data=data(16, 3))
            elif op == "autoresume":
                fit(callbacks=[cb.AutoResume(ro / "state")])
            elif op == "csv":
                fit(callbacks=[cb.CSVLogger(ro / "log.csv")])
    return run


def save_to(make: Any, check_roundtrip: bool = False) -> Any:
    def run(env: Env) -> None:
        p = make(env)
        out = fitted_a().save(p)
        if check_roundtrip:
            expect(which(Path(out)) == "A", "the saved model does not load back")
        else:
            raise Wrong(f"fitted.save({str(p)!r}) wrote {out!r} without an error")
    return run


def under_a_file(env: Env) -> Path:
    (env.tmp / "f").write_text("x")
    return env.tmp / "f" / "model"


def existing_file(env: Env) -> Path:
    (env.tmp / "f").write_text("x")
    return env.tmp / "f"


def keeps_user_files(env: Env) -> None:
    p = fitted_a().save(env.tmp / "model")
    (p / "notes.txt").write_text("mine")
    fitted_b().save(p)
    expect(which(p) == "B", "the new model was not stored")
    if not (p / "notes.txt").exists():
        raise Lost("saving over the folder deleted the user's notes.txt")


# ---------------------------------------------------------------------------- round trips the contract promises


def roundtrip_opt_tuple(env: Env) -> None:
    f = fit(reg_setup(betas=(0.8, 0.9)))
    g = ln.load(f.save(env.tmp / "m"))
    expect(g.opt_hparams.get("betas") == (0.8, 0.9) and isinstance(g.opt_hparams["betas"], tuple),
           f"opt_hparams came back as {g.opt_hparams}")


class NaNAuroc(ln.Callback):
    def on_epoch_end(self, ctx: Any) -> None:
        ctx.history[-1]["valid_auroc"] = float("nan")


def roundtrip_nan_history(env: Env) -> None:
    f = fit(callbacks=[NaNAuroc()])
    g = ln.load(f.save(env.tmp / "m"), module=Net)
    v = g.history[0].get("valid_auroc")
    expect(isinstance(v, float) and v != v, f"history NaN came back as {v!r}")


def roundtrip_hparams(env: Env, **hp: Any) -> None:
    setup = ln.setup(Act, loss=torch.nn.MSELoss()).set_hparams(**hp)
    f = setup.fit(data(), epochs=1, seed=0, **QUIET)
    g = ln.load(f.save(env.tmp / "m"))
    for k, v in hp.items():
        got = g.hparams.get(k)
        same = torch.equal(got, v) if isinstance(v, torch.Tensor) and isinstance(got, torch.Tensor) else got == v
        expect(same, f"hparam {k}={v!r} came back as {got!r}")
    x, _ = data()
    expect(torch.equal(g.predict(x), f.predict(x)), "the loaded model predicts otherwise")


def roundtrip_optimizer(env: Env) -> None:
    x, y = data()
    f = fit()
    p = f.save(env.tmp / "m", optimizer=True)
    g = ln.load(p)
    a = g.fit((x, y), epochs=1, seed=3, dataloader_options={"batch_size": 16}, **QUIET)
    b = f.fit((x, y), epochs=1, seed=3, dataloader_options={"batch_size": 16}, **QUIET)
    expect(same_state(state_of(a), state_of(b)), "training a loaded model (optimizer=True) goes elsewhere than "
           "continuing the original")


def roundtrip_basic(suffix: str) -> Any:
    def run(env: Env) -> None:
        p = fitted_a().save(env.tmp / f"m{suffix}")
        expect(which(Path(p)) == "A", "round trip changed the model")
        g = ln.load(p)  # the recorded import path, no module=
        x, y = data()
        expect(torch.equal(g.predict(x), fitted_a().predict(x)), "predictions differ after the round trip")
        expect(abs(g.evaluate((x, y))["loss"] - fitted_a().evaluate((x, y))["loss"]) < 1e-6, "evaluate differs")
    return run


def rows() -> list[Row]:
    R: list[Row] = []

    def row(id: str, run: Any, names: tuple[str, ...] = (), area: str = "save", **kw: Any) -> None:
        R.append(Row(id, run, tuple(names), area=area, **kw))

    # -------------------------------------------------------------- kill -9 (forked from this warm process)
    for i in range(12):
        row(f"kill-save-folder-event-{i:02d}", save_kill("event", i), expect=CORRECT, area="kill -9 save")
    for i in range(4):
        row(f"kill-save-folder-byte-{i:02d}", save_kill("byte", i), expect=CORRECT, area="kill -9 save")
    for i in range(4):
        row(f"kill-save-file-byte-{i:02d}", save_kill("byte", i, ".safetensors"), expect=CORRECT,
            area="kill -9 save")
    for i in range(8):
        row(f"kill-checkpoint-event-{i:02d}", ckpt_kill("event", i), expect=CORRECT, area="kill -9 checkpoint")
    for i in range(4):
        row(f"kill-checkpoint-byte-{i:02d}", ckpt_kill("byte", i), expect=CORRECT, area="kill -9 checkpoint")
    for i in range(8):
        row(f"kill-autoresume-event-{i:02d}", ar_kill(i), expect=CORRECT, area="kill -9 checkpoint")
    # -------------------------------------------------------------- full disks
    for name, fn in (("save-folder", full_save("model")), ("save-file", full_save("model.safetensors")),
                     ("checkpoint", full_ckpt()), ("autoresume", full_autoresume()), ("csvlogger", full_csv())):
        row(f"enospc-{name}", fn, ("{tmp}", "space"), area="full disk")
    for name, fn in (("save-folder", full_save("model", True)), ("save-file", full_save("model.safetensors", True)),
                     ("checkpoint", full_ckpt(True)), ("autoresume", full_autoresume(True)),
                     ("csvlogger", full_csv(True))):
        row(f"efbig-{name}", fn, ("{tmp}", "too large"), area="full disk")
    # -------------------------------------------------------------- damaged saved models
    row("damage-weights-truncated-half", damaged(truncate(0.5)), ("{weights}",), area="damaged model")
    row("damage-weights-truncated-8", damaged(truncate(8)), ("{weights}",), area="damaged model")
    row("damage-weights-empty", damaged(truncate(0)), ("{weights}",), area="damaged model")
    row("damage-weights-flip-last-byte", damaged(flip(-1)), ("{weights}",), area="damaged model")
    row("damage-weights-flip-dtype", damaged(flip_in_header(b'"F32"', 2)), ("{weights}",),
        area="damaged model")
    row("damage-weights-flip-offsets", damaged(flip_in_header(b'"data_offsets":[', 16)), ("{weights}",),
        area="damaged model")
    row("damage-weights-flip-length", damaged(flip(2)), ("{weights}",), area="damaged model")
    row("damage-weights-zero-data", damaged(zero_data), ("{weights}",), area="damaged model")
    row("damage-weights-zero-all", damaged(zero_all), ("{weights}",), area="damaged model")
    row("damage-weights-missing", damaged(lambda p: _weights(p).unlink()), ("{weights}",),
        area="damaged model")
    row("damage-json-missing", damaged(lambda p: _meta(p).unlink()), ("lanterna.json",), expect=OK,
        area="damaged model")
    row("damage-json-truncated", damaged(lambda p: _meta(p).write_text(_meta(p).read_text()[:50])),
        ("json",), area="damaged model")
    row("damage-json-empty", damaged(write_meta("")), ("json",), area="damaged model")
    row("damage-json-binary", damaged(write_meta(b"\x00\xff\xfe garbage")), ("json",),
        area="damaged model")
    row("damage-json-foreign-format", damaged(write_meta('{"format": "keras", "version": 3}')), ("format",),
        area="damaged model")
    row("damage-json-newer-version", damaged(edit_json(lambda m: m.update(format_version=99))), ("upgrade",),
        area="damaged model")
    row("damage-json-hparams-changed", damaged(edit_json(lambda m: m["hparams"].update(d_hidden=16))),
        ("net.0.weight",), area="damaged model")
    row("damage-json-history-not-list", damaged(edit_json(lambda m: m.update(history="abc"))), ("history",),
        area="damaged model")
    row("damage-json-hparams-not-dict", damaged(edit_json(lambda m: m.update(hparams=[1, 2]))), ("hparams",),
        area="damaged model")
    row("damage-json-no-module", damaged(edit_json(lambda m: m.pop("module")), module=None), ("module=",),
        area="damaged model")
    row("damage-mix-new-weights-old-json", damaged(mix), ("{weights}",), area="damaged model")
    row("damage-file-truncated", damaged(truncate(0.6), "model.safetensors"), ("{weights}",),
        area="damaged model")
    row("damage-file-flip-last-byte", damaged(flip(-1), "model.safetensors"), ("{weights}",),
        area="damaged model")
    row("damage-file-empty", damaged(truncate(0), "model.safetensors"), ("{weights}",),
        area="damaged model")
    row("foreign-plain-safetensors", plain_safetensors, ("{tmp}",), area="damaged model")
    row("foreign-hf-folder", hf_folder, ("{tmp}",), area="damaged model")
    # -------------------------------------------------------------- damaged checkpoints
    row("ckpt-truncated", ckpt_damaged(truncate(0.5)), ("last.pt",), area="damaged checkpoint")
    row("ckpt-flip-tensor-byte", ckpt_damaged(ckpt_flip_tensor), ("last.pt",), area="damaged checkpoint")
    row("ckpt-zero-fill", ckpt_damaged(zero_all), ("last.pt",), area="damaged checkpoint")
    row("ckpt-empty", ckpt_damaged(truncate(0)), ("last.pt", "empty"), area="damaged checkpoint")
    row("ckpt-foreign-torch-save", ckpt_damaged(ckpt_foreign), ("last.pt",), area="damaged checkpoint")
    row("ckpt-newer-format", ckpt_damaged(ckpt_newer), ("upgrade",), area="damaged checkpoint")
    row("ckpt-ln-load-truncated", ckpt_damaged(truncate(0.5), "ln.load"), ("last.pt",), area="damaged checkpoint")
    row("ckpt-ln-load-flip-tensor-byte", ckpt_damaged(ckpt_flip_tensor, "ln.load"), ("last.pt",),
        area="damaged checkpoint")
    row("ckpt-ln-load-whole", ckpt_ln_load, expect=CORRECT, area="damaged checkpoint")
    row("autoresume-newest-damaged", ar_damaged("newest"), expect=CORRECT, area="damaged checkpoint")
    row("autoresume-all-damaged", ar_damaged("all"), expect=CORRECT, area="damaged checkpoint")
    row("autoresume-other-optimizer", ar_changed(optimizer=torch.optim.SGD), ("optimizer",),
        area="damaged checkpoint", max_steps=0)
    row("autoresume-other-architecture", ar_changed(hparams={"d_hidden": 16}), ("net.0.weight",),
        area="damaged checkpoint", max_steps=0)
    row("autoresume-other-data", ar_changed(data=True), ("data",), area="damaged checkpoint", warn=True)
    row("autoresume-newer-format", ar_newer, ("upgrade",), area="damaged checkpoint", max_steps=0)
    # -------------------------------------------------------------- read-only and odd paths
    row("readonly-save-over-previous", readonly("save-over"), ("{tmp}",), area="paths")
    row("readonly-save-new-folder", readonly("save-new"), ("{tmp}",), area="paths")
    row("readonly-save-file", readonly("save-file"), ("{tmp}",), area="paths")
    row("readonly-load", readonly("load"), expect=CORRECT, area="paths")
    row("readonly-checkpoint", readonly("checkpoint"), ("{tmp}",), area="paths", max_steps=0)
    row("readonly-autoresume", readonly("autoresume"), ("{tmp}",), area="paths", max_steps=0)
    row("readonly-csvlogger", readonly("csv"), ("{tmp}",), area="paths", max_steps=0)
    row("path-under-a-file", save_to(under_a_file), ("{tmp}",), area="paths")
    row("path-is-a-file", save_to(existing_file), ("{tmp}",), area="paths")
    row("path-empty-string", save_to(lambda env: ""), ("path",), area="paths")
    row("path-name-too-long", save_to(lambda env: env.tmp / ("m" * 300)), ("too long",), area="paths")
    row("path-unicode-spaces", save_to(lambda env: env.tmp / "mödel dir" / "ünï côdé", True), expect=CORRECT,
        area="paths")
    row("path-trailing-slash", save_to(lambda env: str(env.tmp / "m") + "/", True), expect=CORRECT, area="paths")
    row("path-new-parents-file", save_to(lambda env: env.tmp / "a" / "b" / "m.safetensors", True), expect=CORRECT,
        area="paths")
    row("path-save-keeps-user-files", keeps_user_files, expect=CORRECT, area="paths")
    row("load-missing-path", lambda env: ln.load(env.tmp / "nothing"), ("nothing",), area="paths")
    row("load-empty-string", lambda env: ln.load(""), ("model",), area="paths")
    row("load-unrelated-folder", lambda env: ln.load(env.tmp), ("{tmp}",), area="paths")
    # -------------------------------------------------------------- round trips
    row("roundtrip-folder", roundtrip_basic(""), expect=CORRECT, area="round trip")
    row("roundtrip-file", roundtrip_basic(".safetensors"), expect=CORRECT, area="round trip")
    row("roundtrip-opt-hparams-tuple", roundtrip_opt_tuple, expect=CORRECT, area="round trip")
    row("roundtrip-nan-in-history", roundtrip_nan_history, expect=CORRECT, area="round trip")
    row("roundtrip-dtype-hparam", lambda env: roundtrip_hparams(env, dtype=torch.float64), expect=CORRECT,
        area="round trip")
    row("roundtrip-tensor-hparam", lambda env: roundtrip_hparams(env, scale=torch.tensor([2.0])), expect=CORRECT,
        area="round trip")
    row("roundtrip-module-class-hparam", lambda env: roundtrip_hparams(env, act=torch.nn.Tanh), expect=CORRECT,
        area="round trip")
    row("roundtrip-optimizer-state", roundtrip_optimizer, expect=CORRECT, area="round trip")
    return R


ROWS = rows()


@pytest.mark.parametrize("row", params(ROWS))
def test_persistence(row: Row) -> None:
    check_row(GROUP, row)

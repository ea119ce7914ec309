"""The fault-table harness (issue #11): every case is a :class:`Row`, run once and classified, the way SQLite
and safetensors test themselves — not pass/fail, but *how* lanterna answered.

Classes (:data:`CLASSES`):

- ``clear error``: a :class:`lanterna.errors.LanternaError` whose message names the problem (every word of
  ``Row.names`` appears in it, case-insensitive; ``{tmp}`` stands for the row's folder), or, for a row with
  ``warn=True``, a warning that does. A row with ``max_steps`` also needs the error before more optimizer
  steps than that ran (0: before training; a typed error that comes later is classified ``raw error``, "late").
- ``raw error``: any other exception (a traceback from inside torch, a ``KeyError`` ...).
- ``correct``: no exception, and the case's own check of the outcome against the expected value (weights,
  loss, file contents) passed.
- ``silent wrong``: no exception, but the check failed (the case raises :class:`Wrong`), or a ``post`` check
  found a wrong side effect (a temp file left, a file written outside its folder).
- ``hang``: the case ran past its ``timeout`` (an in-process alarm, or a forked child that did not end).
- ``data lost``: a previously valid file is no longer loadable (the case raises :class:`Lost`).
- ``code executed``: a payload wrote a marker file into the row's ``markers`` folder.

Priority when several apply: code executed > data lost > hang > silent wrong (post) > the rest.

Each table module (``test_*.py`` next to this file) has a ``ROWS`` list and one pytest test parametrised
over it (one test id per row); ``summary.py`` runs the same rows and prints the counts per class.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # summary.py runs outside pytest: conftest's models by import
    sys.path.insert(0, str(TESTS))

from lanterna.errors import LanternaError  # noqa: E402

CLEAR, CORRECT, RAW, SILENT, HANG, LOST, EXECUTED = (
    "clear error", "correct", "raw error", "silent wrong", "hang", "data lost", "code executed")
CLASSES = (CLEAR, CORRECT, RAW, SILENT, HANG, LOST, EXECUTED)
OK = frozenset({CLEAR, CORRECT})  # for rows where refusing and doing it right are both fine

RESULTS_DIR = Path(tempfile.gettempdir()) / "lanterna-reliability"


def _scratch_root() -> str | None:
    """Rows write under /dev/shm where it exists: a tmpfs, where fsync costs nothing (the tables test kills
    and full disks, not power loss), so the many atomic writes stay fast on a busy machine."""
    for root in (os.environ.get("LANTERNA_RELIABILITY_TMP"), "/dev/shm"):
        if root and os.path.isdir(root) and os.access(root, os.W_OK):
            return root
    return None


SCRATCH_ROOT = _scratch_root()


def scratch(prefix: str) -> Path:
    """A new folder for a row or a shared fixture (removed at exit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_ROOT))
    atexit.register(shutil.rmtree, path, True)
    return path


class Wrong(Exception):
    """Raised by a case: no error, but the outcome differs from the expected value."""


class Lost(Exception):
    """Raised by a case: a file that was valid before the case can no longer be loaded."""


class _Timeout(BaseException):
    pass


class ChildError(Exception):
    """An exception raised inside a forked child, re-raised in the parent (raw)."""


class ChildLanternaError(LanternaError):
    """A LanternaError raised inside a forked child, re-raised in the parent (its message kept)."""


@dataclasses.dataclass
class Env:
    """What a case gets: its own folder, the folder payloads write markers to, and an optimizer-step count."""

    tmp: Path
    markers: Path
    steps: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    vars: dict[str, str] = dataclasses.field(default_factory=dict)  # more {name} placeholders for Row.names


@dataclasses.dataclass(frozen=True)
class Row:
    """One case of a table.

    Args:
        id: the test id (unique in its table).
        run: ``run(env)`` performs the case; it returns normally when the outcome checked out, raises
            :class:`Wrong` / :class:`Lost` when not, or lets lanterna's exception through.
        names: words a clear error's message must contain (all, case-insensitive); ``{tmp}`` is the row's
            folder and ``{key}`` any ``env.vars[key]`` the case set.
        expect: the expected class, or a set of acceptable classes.
        area: the part of lanterna the row belongs to (for the report).
        max_steps: a clear error counts only if at most this many optimizer steps ran before it (0: refused
            before training; 1: at the first batch, as API.md §2 asks of bad input).
        warn: a warning naming the problem counts as a clear error (where the contract says warn).
        post: ``post(env)`` runs after ``run`` whatever happened (checks side effects).
        timeout: seconds before the row is a hang.
    """

    id: str
    run: Callable[[Env], Any]
    names: tuple[str, ...] = ()
    expect: str | frozenset[str] = CLEAR
    area: str = ""
    max_steps: int | None = None
    warn: bool = False
    post: Callable[[Env], Any] | None = None
    timeout: float = 30.0

    @property
    def expected(self) -> frozenset[str]:
        return frozenset({self.expect}) if isinstance(self.expect, str) else frozenset(self.expect)


@dataclasses.dataclass
class Outcome:
    cls: str
    message: str
    seconds: float = 0.0


def one_line(e: BaseException | str, limit: int = 240) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names_match(names: tuple[str, ...], message: str, env: Env) -> list[str]:
    low = message.lower()
    subs = {"tmp": str(env.tmp), **env.vars}
    missing = []
    for n in names:
        for key, value in subs.items():
            n = n.replace("{" + key + "}", value)
        if n.lower() not in low:
            missing.append(n)
    return missing


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    if threading_main() and seconds:
        def fire(signum: int, frame: Any) -> None:
            raise _Timeout()

        previous = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    else:
        yield


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _count_steps(env: Env) -> Iterator[None]:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        env.steps += 1

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def classify(row: Row, base: Path | None = None) -> Outcome:
    """Run ``row`` in a fresh folder and classify what happened."""
    tmp = Path(tempfile.mkdtemp(prefix=f"lanterna-rel-{row.id[:40]}-", dir=base or SCRATCH_ROOT))
    env = Env(tmp=tmp / "work", markers=tmp / "markers")
    env.tmp.mkdir()
    env.markers.mkdir()
    cwd = os.getcwd()
    t0 = time.perf_counter()
    outcome: Outcome | None = None
    post_error: BaseException | None = None
    caught: list[warnings.WarningMessage] = []
    try:
        os.chdir(env.tmp)  # a case that writes relative paths writes into its own folder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _count_steps(env), _alarm(row.timeout):
                try:
                    row.run(env)
                    outcome = None
                except _Timeout:
                    outcome = Outcome(HANG, f"no answer within {row.timeout:g} s")
                except Lost as e:
                    outcome = Outcome(LOST, one_line(str(e)))
                except Wrong as e:
                    outcome = Outcome(SILENT, one_line(str(e)))
                except LanternaError as e:
                    outcome = _typed(row, env, e)
                except (Exception, KeyboardInterrupt, SystemExit) as e:
                    outcome = Outcome(RAW, one_line(e) + _where(e))
            if row.post is not None:
                try:
                    with _alarm(row.timeout):
                        row.post(env)
                except BaseException as e:  # noqa: BLE001 - classified below
                    post_error = e
    finally:
        os.chdir(cwd)
    if outcome is None:
        outcome = _no_exception(row, env, caught)
    if post_error is not None:
        if isinstance(post_error, Lost):
            outcome = Outcome(LOST, one_line(str(post_error)))
        elif isinstance(post_error, _Timeout):
            outcome = Outcome(HANG, "the post-check did not finish")
        elif isinstance(post_error, Wrong):
            if outcome.cls not in (HANG, LOST):
                outcome = Outcome(SILENT, one_line(str(post_error)) + f" (the case itself: {outcome.cls})")
        else:
            outcome = Outcome(RAW, "post-check failed: " + one_line(post_error))
    markers = sorted(p.name for p in env.markers.iterdir())
    if markers:
        outcome = Outcome(EXECUTED, f"payload wrote {markers} (the case itself: {outcome.cls}: {outcome.message})")
    outcome.seconds = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    return outcome


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    frames = [f for f in tb if "site-packages" in f.filename or "/lanterna/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" [at {Path(f.filename).name}:{f.lineno}]"


def _typed(row: Row, env: Env, e: LanternaError) -> Outcome:
    message = str(e)
    missing = _names_match(row.names, message, env)
    if missing:
        return Outcome(RAW, f"typed error not naming {missing}: " + one_line(e))
    if row.max_steps is not None and env.steps > row.max_steps:
        return Outcome(RAW, f"late: typed error after {env.steps} optimizer step(s): " + one_line(e))
    return Outcome(CLEAR, one_line(e))


def _no_exception(row: Row, env: Env, caught: list[warnings.WarningMessage]) -> Outcome:
    if row.warn:
        texts = [str(w.message) for w in caught]
        for text in texts:
            if not _names_match(row.names, text, env):
                return Outcome(CLEAR, "warned: " + one_line(text))
        return Outcome(SILENT, "no error and no warning naming the problem"
                       + (f" (warnings: {one_line('; '.join(texts), 160)})" if texts else ""))
    return Outcome(CORRECT, "; ".join(env.notes) or "outcome checked")


_pruned = False


def record(group: str, row: Row, outcome: Outcome) -> None:
    """Append the row's outcome to this process's results file (read by ``summary.py --last``); the files of
    all but the last few runs are removed."""
    global _pruned
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if not _pruned:
        _pruned = True
        old = sorted(RESULTS_DIR.glob("results-*.jsonl"), key=lambda p: p.stat().st_mtime)[:-4]
        for p in old:
            with contextlib.suppress(OSError):
                p.unlink()
    line = json.dumps({"group": group, "id": row.id, "area": row.area, "cls": outcome.cls,
                       "expected": sorted(row.expected), "message": outcome.message, "seconds": outcome.seconds})
    with open(RESULTS_DIR / f"results-{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


#: Rows for features a later issue delivers, as strict xfails (each must flip to passing when it lands); none now.
LATER: dict[str, str] = {}


def params(rows: list[Row]) -> list[Any]:
    """The rows as pytest params, one id per row; the :data:`LATER` rows are strict xfails."""
    return [pytest.param(r, id=r.id, marks=pytest.mark.xfail(strict=True, reason=LATER[r.id]))
            if r.id in LATER else pytest.param(r, id=r.id) for r in rows]


def check_row(group: str, row: Row) -> None:
    """The body of each table's test: classify, record, assert the expected class."""
    outcome = classify(row)
    record(group, row, outcome)
    assert outcome.cls in row.expected, (
        f"[{group}/{row.area}] {row.id}: expected {' or '.join(sorted(row.expected))}, "
        f"observed {outcome.cls}: {outcome.message}"
    )


def expect(condition: Any, message: str) -> None:
    """Raise :class:`Wrong` with ``message`` unless ``condition``."""
    if not condition:
        raise Wrong(message)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---------------------------------------------------------------------------- forked children


@dataclasses.dataclass
class Child:
    """What a forked child did: ``status`` "exit" | "signal" | "hang", and what it reported."""

    status: str
    code: int | None = None
    sig: int | None = None
    value: Any = None
    error: dict[str, Any] | None = None
    events: int = 0

    def reraise(self) -> Any:
        """The child's outcome in the parent: its value, or its exception re-raised (typed or raw)."""
        if self.status == "hang":
            raise _Timeout()
        if self.error is not None:
            msg = f"{self.error['type']}: {self.error['message']}"
            if self.error["lanterna"]:
                raise ChildLanternaError(msg)
            raise ChildError(msg)
        if self.status == "signal":
            raise ChildError(f"the child died of signal {self.sig} ({signal.Signals(self.sig).name})")
        if self.code not in (0, None):
            raise ChildError(f"the child exited with status {self.code}")
        return self.value


_FS_EVENTS = frozenset({"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.link",
                        "os.symlink", "os.chmod", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"})


def _install_fs_hook(root: str, kill_at: int | None, counter: list[int]) -> None:
    """Count file-system operations (Python audit events) on paths under ``root``; SIGKILL this process just
    before the operation number ``kill_at`` (0-based) runs."""

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in _FS_EVENTS or not args or isinstance(args[0], int) or args[0] is None:
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if not path.startswith(root):
            return
        if kill_at is not None and counter[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        counter[0] += 1

    sys.addaudithook(hook)


def forked(
    fn: Callable[[], Any],
    *,
    timeout: float = 20.0,
    fsize: int | None = None,
    kill_on_fsize: bool = False,
    fs_root: Path | None = None,
    kill_at_event: int | None = None,
) -> Child:
    """Run ``fn()`` in a child forked from this (warm) process and wait for it.

    Args:
        fn: returns a JSON-able value, reported back.
        timeout: seconds before the child is killed and reported as a hang.
        fsize: RLIMIT_FSIZE for the child: no file may grow past this many bytes.
        kill_on_fsize: with ``fsize``, SIGXFSZ kills the child at that byte (default: ignored, so the write
            fails with EFBIG).
        fs_root: count the file operations under this folder (``Child.events``).
        kill_at_event: SIGKILL the child just before its file operation number ``kill_at_event`` under
            ``fs_root``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(signal.SIGINT, signal.default_int_handler)
            counter = [0]
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL if kill_on_fsize else signal.SIG_IGN)
                _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))
            if fs_root is not None:
                _install_fs_hook(os.path.abspath(fs_root), kill_at_event, counter)
            report: dict[str, Any] = {}
            try:
                report["value"] = fn()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                report["exit"] = code
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                report["error"] = {"type": type(e).__name__, "message": str(e),
                                   "lanterna": isinstance(e, LanternaError)}
            report["events"] = counter[0]
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            data = json.dumps(report, default=repr).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    status = None
    os.set_blocking(r, False)
    while True:
        with contextlib.suppress(BlockingIOError):
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return Child("hang")
        time.sleep(0.002)
    os.set_blocking(r, True)
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    report = {}
    with contextlib.suppress(ValueError):
        report = json.loads(b"".join(chunks) or b"{}")
    if os.WIFSIGNALED(status):
        child = Child("signal", sig=os.WTERMSIG(status))
    else:
        child = Child("exit", code=os.WEXITSTATUS(status))
    child.value, child.error, child.events = report.get("value"), report.get("error"), report.get("events", 0)
    return child


# ---------------------------------------------------------------------------- small disks and read-only folders


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def tiny_disk(folder: Path, size: str = "64k") -> Iterator[Path | None]:
    """A tmpfs of ``size`` mounted at ``folder`` (root only); None where it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system of ``folder`` until a write fails, then free ``leave`` bytes (whole pages)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
    if leave:
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))


@contextlib.contextmanager
def read_only_folder(folder: Path, fill_with: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """A folder that cannot be written: a tmpfs remounted read-only (root) or mode 0o555 (others).
    ``fill_with(folder)`` runs first, while it is writable."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))
    try:
        if fill_with is not None:
            fill_with(folder)
        if mounted:
            if not _mount("-o", "remount,ro", str(folder)):
                raise RuntimeError("could not remount the tmpfs read-only")
        else:
            folder.chmod(0o555)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)

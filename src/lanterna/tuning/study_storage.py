"""The study storage of ``ln.tune``: ``ln.tuning.storage`` (SQLite in WAL mode, lock timeouts, heartbeats and
retries) and the clear errors for a storage that is damaged, read-only or cannot be created (docs/models.md)."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import re
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..callbacks.optuna_pruning import import_optuna
from ..errors import LanternaError

__all__ = ["storage", "DEFAULT_STORAGE"]

#: Where ``tune`` keeps its studies unless told otherwise: a SQLite file in the working directory.
DEFAULT_STORAGE = "sqlite:///lanterna_tune.db"

_PASSWORD = re.compile(r"//([^:/@]*):[^@/]*@")  # user:password@ in a database URL
_JITTER = random.Random()  # its own generator: waiting must not move the user's random state


def storage(
    url: str | os.PathLike[str] | None = None,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    timeout: float = 60.0,
) -> Any:
    """An Optuna ``RDBStorage`` that several processes can share safely.

    ``url`` is a database URL or the path of a SQLite file (default :data:`DEFAULT_STORAGE`). For SQLite the
    file is put in WAL mode (readers never block the writer) and connections wait up to ``timeout`` seconds
    for a lock instead of failing with "database is locked". Heartbeats are on: a trial whose process died
    (killed, out of memory, node lost) stops beating and, ``grace_period`` seconds later (default twice the
    interval), the next trial started by any worker marks it FAILED and enqueues a retry with the same
    parameters (at most ``max_retry`` times). ``heartbeat_interval=None`` turns that off.

    SQLite suits processes on one machine (a local disk; not NFS). For several machines use a server
    database: ``storage("postgresql://user:pw@host/db")``. ``":memory:"`` gives Optuna's in-memory storage
    (one process, nothing kept).

    Args:
        url: a database URL, the path of a SQLite file or ``":memory:"``; default :data:`DEFAULT_STORAGE`.
        heartbeat_interval: seconds between a running trial's heartbeats; None turns heartbeats off.
        grace_period: seconds without a heartbeat after which a trial counts as dead (default: twice the
            interval).
        max_retry: how many times a dead trial is retried with the same parameters.
        timeout: seconds a SQLite connection waits for a lock.

    Returns:
        An ``optuna.storages.RDBStorage`` (an ``InMemoryStorage`` for ``":memory:"``).

    Raises:
        LanternaError: when the database is damaged, read-only or unreachable (the error names it and the cause).

    >>> import lanterna as ln, optuna
    >>> st = ln.tuning.storage("studies.db")
    >>> study = optuna.create_study(study_name="mnist", storage=st, load_if_exists=True)
    >>> study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=2)
    >>> again = optuna.load_study(study_name="mnist", storage=ln.tuning.storage("studies.db"))
    >>> len(again.trials)
    2
    """
    optuna = import_optuna()
    if url is not None and os.fspath(url) == ":memory:":  # one process: no database, no heartbeats
        return optuna.storages.InMemoryStorage()
    where = _describe_storage(url)
    url = _url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = _sqlite_path(url)
        if path is not None:
            with _storage_errors(where):
                _enable_wal(path, timeout)
        engine_kwargs = {"connect_args": {"timeout": float(timeout)}}
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental by Optuna
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval is not None:
            kwargs["heartbeat_interval"] = int(heartbeat_interval)
            kwargs["grace_period"] = int(grace_period) if grace_period is not None else None
            if max_retry:
                retry = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                         or optuna.storages.RetryFailedTrialCallback)
                params = inspect.signature(optuna.storages.RDBStorage).parameters
                key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else (
                    "failed_trial_callback")
                kwargs[key] = retry(max_retry=int(max_retry))
        with _storage_errors(where):
            return _retry_locked(lambda: optuna.storages.RDBStorage(url, **kwargs))


def _url(url: str | os.PathLike[str] | None) -> str:
    if url is None:
        return DEFAULT_STORAGE
    text = os.fspath(url)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def _sqlite_path(url: str) -> Path | None:
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _enable_wal(path: Path, timeout: float) -> None:
    """WAL mode is a property of the database file: set once, every later connection uses it."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def set_wal() -> None:
        con = sqlite3.connect(str(path), timeout=timeout)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    _retry_locked(set_wal)


def _retry_locked(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Run ``fn``, retrying when concurrent workers hold a lock or race to create the same tables or study;
    any other error (a damaged or read-only file, an existing study) is raised at once."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or i == attempts - 1:
                raise
            time.sleep(0.05 * (2 ** i) * (1 + _JITTER.random()))
    raise AssertionError("unreachable")


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _transient(e: BaseException) -> bool:
    chain = _chain(e)
    names = {type(x).__name__ for x in chain}
    if "DuplicatedStudyError" in names:
        return False
    text = " ".join(str(x) for x in chain).lower()
    return "IntegrityError" in names or any(k in text for k in ("database is locked", "database table is locked",
                                                                  "busy", "already exists"))


def _describe_storage(storage: Any) -> str:
    """How errors name a storage: the SQLite file, the URL without its password, or the storage's type."""
    if storage is None or isinstance(storage, (str, os.PathLike)):
        if storage is not None and os.fspath(storage) == ":memory:":
            return "the in-memory storage"
        url = _url(storage)
        path = _sqlite_path(url) if url.startswith("sqlite:") else None
        if path is not None:
            return f"the study file {str(path.expanduser().resolve())!r}"
        shown = _PASSWORD.sub(r"//\1:***@", url)
        return f"the study storage {shown!r}"
    url = getattr(storage, "url", None)  # type: ignore[assignment]  # an RDBStorage
    return _describe_storage(url) if isinstance(url, str) else f"the {type(storage).__name__}"


def _check_writable(path: Path | None) -> None:
    """A read-only study file (or folder, where SQLite writes its -wal and -shm files) fails now, not after
    Optuna's retries or at the first trial's write."""
    if path is None:
        return
    path = path.expanduser().resolve()
    fix = "Make it writable, or pass another storage=... (a path in a folder you can write to)."
    if path.exists() and not os.access(path, os.W_OK):
        raise LanternaError(f"The study file {str(path)!r} is read-only (no write permission): tune writes every "
                            f"trial to it. {fix}")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise LanternaError(f"The folder of the study file {str(path)!r} is read-only: SQLite writes the file and "
                            f"its -wal/-shm files there. {fix}")


@contextlib.contextmanager
def _storage_errors(where: str) -> Any:
    """Turn a damaged, read-only or unreachable database into an error that names it and the cause."""
    try:
        yield
    except LanternaError:
        raise
    except Exception as e:
        message = _storage_problem(e, where)
        if message is None:
            raise
        raise LanternaError(message) from e


def _storage_problem(e: BaseException, where: str) -> str | None:
    chain = _chain(e)
    text = " ".join(str(x) for x in chain).lower()
    subject = where[0].upper() + where[1:]
    fix = "Move it away or pass another storage=... (a new file starts a new study)."
    for marker in ("file is not a database", "database disk image is malformed", "not a database"):
        if marker in text:
            return (f"{subject} is not a SQLite database ({marker}): it is damaged, or some other kind of file. "
                    f"{fix}")
    for marker in ("attempt to write a readonly database", "readonly database", "read-only file system"):
        if marker in text:
            return (f"{subject} is read-only ({marker}): tune writes every trial to it. Make it writable, or pass "
                    "another storage=... (a path in a folder you can write to).")
    os_error = next((x for x in chain if isinstance(x, OSError)), None)
    if os_error is not None:
        if isinstance(os_error, (FileExistsError, NotADirectoryError)) and os_error.filename:
            path = Path(os.fsdecode(os_error.filename))
            blocker = next((p for p in (path, *path.parents) if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                return (f"{subject} cannot be created: {str(blocker)!r} is a file, not a folder. "
                        "Pass another storage=....")
        return f"{subject} cannot be created ({type(os_error).__name__}: {os_error.strerror or os_error}). {fix}"
    if "unable to open database file" in text:
        return (f"{subject} cannot be opened (unable to open database file): is its folder missing or read-only? "
                "Pass another storage=....")
    return None

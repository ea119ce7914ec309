"""Experiment trackers: :class:`MLflowLogger` and :class:`WandbLogger` (docs/callbacks.md, "Trackers").

Both log the fit's hparams and opt_hparams as parameters, every history value of every epoch (step = epoch),
the saved model (``fitted.save``'s folder) as an artifact, and end the run with the way fit ended. mlflow and
wandb are optional dependencies, imported only when a logger is created. (Over 350 lines: two trackers on one
base whose run life — open, reopen on resume, log, close with a status — is the same.)
"""

from __future__ import annotations

import abc
import numbers
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["MLflowLogger", "WandbLogger"]

# ctx.status -> MLflow's RunStatus name (W&B: an exit code, 0 = finished).
_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}
_EXIT_CODE = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}
_MLFLOW_PARAM_LIMIT = 6000  # characters of a param value (mlflow >= 2.13)


def _require(module: str, who: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{who} needs the {module} package: pip install {module} ({e})") from e


def run_status(ctx: Context) -> str:
    """MLflow's name for how fit ended: ``FINISHED``, ``FAILED`` (an error) or ``KILLED`` (Ctrl-C, or a
    preemption's SIGTERM exit under AutoResume)."""
    from ..callbacks.auto_resume import AutoResume

    if any(isinstance(cb, AutoResume) and cb.preempted for cb in getattr(ctx.hooks, "callbacks", ())):
        return "KILLED"
    return _STATUS.get(ctx.status, "FINISHED")


def flat_metrics(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """``(name, value)`` for each number of a history record; a list of values (per class) gives
    ``<key>/<i>``, a dict ``<key>/<name>``; booleans and other values are left out.

    >>> from lanterna.integrations.trackers import flat_metrics
    >>> list(flat_metrics({"epoch": 1, "train_loss": 0.5, "valid_f1": [0.25, 0.75], "note": "x"}))
    [('epoch', 1.0), ('train_loss', 0.5), ('valid_f1/0', 0.25), ('valid_f1/1', 0.75)]
    """
    for key, value in record.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, numbers.Real):
            yield key, float(value)
        elif isinstance(value, (list, tuple)):
            yield from flat_metrics({f"{key}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            yield from flat_metrics({f"{key}/{k}": v for k, v in value.items()})


def _param_value(value: Any) -> Any:
    """A JSON-friendly value for a tracker's config: plain values as they are, tuples as lists, classes by
    their import path, anything else by ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_param_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _param_value(v) for k, v in value.items()}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


def fit_params(ctx: Context) -> dict[str, Any]:
    """The fit's hparams, and its opt_hparams as ``opt_<name>`` (the names TensorBoard's HPARAMS tab uses)."""
    setup = ctx.setup
    if setup is None:
        return {}
    params = {str(k): _param_value(v) for k, v in setup.hparams.items()}
    params.update({f"opt_{k}": _param_value(v) for k, v in setup.opt_hparams.items()})
    return params


class _Tracker(Callback, abc.ABC):
    """What both trackers share: the run is opened at the first epoch (after AutoResume, order 1200, has
    restored this callback's state at ``on_fit_begin``, so a resumed fit reopens the same run), each epoch's
    record is logged at epoch end (order 800: after the scheduler step and KeepBestModel, before checkpoints,
    so a checkpoint holds the run id and the last epoch logged), and at fit end the model is saved into the
    run and the run is ended with the fit's status. Only the main process logs."""

    order = 800
    _who = "tracker"

    def __init__(self, log_model: bool = True) -> None:
        self.log_model = bool(log_model)
        self.run_id: str | None = None
        self._logged = 0  # the last epoch logged into the run
        self._resume: dict[str, Any] | None = None
        self._active = False

    # ------------------------------------------------------------------ state (AutoResume)
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "epoch": self._logged} if self.run_id is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state.get("run_id") else None

    # ------------------------------------------------------------------ fit
    def on_fit_begin(self, ctx: Context) -> None:
        self._active = bool(ctx.is_main)
        self.run_id, self._logged, self._resume = None, 0, None

    def on_epoch_begin(self, ctx: Context) -> None:
        if self._active and self.run_id is None:
            resume, self._resume = self._resume, None
            if resume is not None:
                self._logged = int(resume.get("epoch", 0))
                self.run_id = self._reopen(ctx, str(resume["run_id"]))
            else:
                self.run_id = self._open(ctx)

    def on_epoch_end(self, ctx: Context) -> None:
        if not self._active or self.run_id is None:
            return
        record = ctx.history[-1]
        epoch = int(record.get("epoch", ctx.epoch))
        if epoch <= self._logged:  # logged before a crash, trained again after the resume
            return
        self._log(dict(flat_metrics(record)), epoch)
        self._logged = epoch

    def on_fit_end(self, ctx: Context) -> None:
        if not self._active or self.run_id is None:
            return
        status = run_status(ctx)
        try:
            if self.log_model and status != "FAILED":
                self._save_model(ctx)
        finally:
            self._close(ctx, status)
            self._active = False

    def _save_model(self, ctx: Context) -> None:
        from ..results import Fitted

        metrics = ctx.metrics.get("valid") or ctx.metrics.get("train") or []
        fitted = Fitted(ctx.model, ctx.setup, list(ctx.history), metrics=metrics, status=ctx.status)
        with tempfile.TemporaryDirectory(prefix="lanterna-model-") as tmp:
            try:
                folder = fitted.save(Path(tmp) / "model")
            except Exception as e:  # the run still ends with its status; the fit's result is not lost
                warnings.warn(f"{self._who}: the model could not be saved into the run ({type(e).__name__}: "
                              f"{e}); its metrics are logged.", stacklevel=2)
                return
            self._log_model(folder)

    # ------------------------------------------------------------------ per tracker
    @abc.abstractmethod
    def _open(self, ctx: Context) -> str:
        ...

    @abc.abstractmethod
    def _reopen(self, ctx: Context, run_id: str) -> str:
        ...

    @abc.abstractmethod
    def _log(self, metrics: dict[str, float], epoch: int) -> None:
        ...

    @abc.abstractmethod
    def _log_model(self, folder: Path) -> None:
        ...

    @abc.abstractmethod
    def _close(self, ctx: Context, status: str) -> None:
        ...


class MLflowLogger(_Tracker):
    """Log the fit into an MLflow run: hparams and opt_hparams (``opt_<name>``) as params, every history value
    of every epoch as a metric with step = epoch (a per-class list as ``<key>/<i>``), the saved model
    (``fitted.save``'s folder, loadable with ``ln.load``) as the artifact folder ``model``, and the tag
    ``lanterna.status`` (``completed``, ``stopped_early`` ...). The run ends ``FINISHED``, or ``FAILED`` when fit
    raises (no model is logged then) and ``KILLED`` when it is interrupted (Ctrl-C, a preemption).

    Resumable: under :class:`~lanterna.callbacks.AutoResume` the run id is part of the checkpoint, so a
    restarted fit continues the same run, and epochs already logged are not logged again. Only the main process
    logs (order 800). The run is logged through ``MlflowClient``, so a run the script has open with
    ``mlflow.start_run()`` is left as it is.

    Args:
        experiment: the experiment's name, created when missing; default ``MLFLOW_EXPERIMENT_NAME`` or
            MLflow's default experiment.
        run_name: the run's name; default: MLflow picks one.
        tracking_uri: where runs are stored (``"sqlite:///mlflow.db"``, ``"http://host:5000"`` ...); default
            ``MLFLOW_TRACKING_URI`` or MLflow's own default.
        log_model: log the saved model as an artifact at the end of fit.

    Raises:
        ImportError: mlflow is not installed (``pip install mlflow``).

    >>> import tempfile, lanterna as ln, torch
    >>> from torch import nn
    >>> from mlflow.tracking import MlflowClient
    >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    >>> logger = ln.callbacks.MLflowLogger(experiment="demo", tracking_uri=uri, log_model=False)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((torch.randn(64, 3), torch.randn(64, 1)), epochs=2, verbose=False, callbacks=[logger])
    >>> client = MlflowClient(uri)
    >>> [m.value for m in client.get_metric_history(logger.run_id, "train_loss")] == [
    ...     h["train_loss"] for h in fitted.history]
    True
    >>> client.get_run(logger.run_id).info.status, client.get_run(logger.run_id).data.params["in_features"]
    ('FINISHED', '3')
    """

    _who = "MLflowLogger"

    def __init__(self, experiment: str | None = None, run_name: str | None = None,
                 tracking_uri: str | os.PathLike[str] | None = None, log_model: bool = True) -> None:
        super().__init__(log_model)
        for name, value in (("experiment", experiment), ("run_name", run_name)):
            if value is not None and not isinstance(value, str):
                raise LanternaError(f"MLflowLogger({name}={value!r}): give a string (or None for the default).")
        if tracking_uri is not None and not isinstance(tracking_uri, (str, os.PathLike)):
            raise LanternaError(f"MLflowLogger(tracking_uri={tracking_uri!r}): give a URI such as "
                                "'sqlite:///mlflow.db' or 'http://localhost:5000'.")
        _require("mlflow", "MLflowLogger")
        from mlflow.tracking import MlflowClient

        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = None if tracking_uri is None else os.fspath(tracking_uri)
        self._client_cls = MlflowClient
        self._client: Any = None

    def _client_(self) -> Any:
        if self._client is None:
            self._client = self._client_cls(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        client = self._client_()
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)

    def _open(self, ctx: Context) -> str:
        from mlflow.entities import Param

        client = self._client_()
        run = client.create_run(self._experiment_id(), run_name=self.run_name,
                                tags={"lanterna.status": "running"})
        params = []
        for key, value in fit_params(ctx).items():
            text = value if isinstance(value, str) else str(value)
            if len(text) > _MLFLOW_PARAM_LIMIT:
                warnings.warn(f"MLflowLogger: param {key!r} is {len(text)} characters long; MLflow keeps "
                              f"{_MLFLOW_PARAM_LIMIT}, so it is logged cut short.", stacklevel=2)
                text = text[: _MLFLOW_PARAM_LIMIT - 3] + "..."
            params.append(Param(key, text))
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        return str(run.info.run_id)

    def _reopen(self, ctx: Context, run_id: str) -> str:
        client = self._client_()
        try:
            client.get_run(run_id)
        except Exception as e:
            where = repr(self.tracking_uri) if self.tracking_uri else "the default tracking URI"
            raise LanternaError(
                f"MLflowLogger: the checkpoint resumes MLflow run {run_id!r}, which {where} does not hold "
                f"({type(e).__name__}: {e}). Give the tracking_uri of the first run, or remove the AutoResume "
                "folder to start afresh.") from e
        history = client.get_metric_history(run_id, "epoch")  # epochs logged after the checkpoint, if any
        self._logged = max([self._logged, *(int(m.step) for m in history)])
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "lanterna.status", "running")
        return run_id

    def _log(self, metrics: dict[str, float], epoch: int) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entries = [Metric(k, v, stamp, epoch) for k, v in metrics.items()]
        for i in range(0, len(entries), 1000):  # log_batch takes at most 1000 metrics
            self._client_().log_batch(self.run_id, metrics=entries[i:i + 1000])

    def _log_model(self, folder: Path) -> None:
        self._client_().log_artifacts(self.run_id, str(folder), artifact_path="model")

    def _close(self, ctx: Context, status: str) -> None:
        client = self._client_()
        client.set_tag(self.run_id, "lanterna.status", ctx.status)
        client.set_terminated(self.run_id, status=status)

    def __repr__(self) -> str:
        return f"MLflowLogger(experiment={self.experiment!r}, run_name={self.run_name!r})"


class WandbLogger(_Tracker):
    """Log the fit into a Weights & Biases run: hparams and opt_hparams (``opt_<name>``) as the run's config,
    every history value of every epoch with step = epoch, the saved model (``fitted.save``'s folder) as a
    ``model`` artifact, ``lanterna_status`` in the summary. The run ends with exit code 0 (finished), 1 when
    fit raises (no model is logged then) or 130 when it is interrupted (W&B shows both as failed).

    ``mode="offline"`` (or ``WANDB_MODE=offline``) writes the run under ``WANDB_DIR`` for ``wandb sync``,
    without an account. Resumable: under :class:`~lanterna.callbacks.AutoResume` the run id is part of the
    checkpoint, and a restarted fit continues the same run (``resume="allow"``) from the epoch after the
    checkpoint. Only the main process logs (order 800).

    Args:
        project: the W&B project; default ``WANDB_PROJECT`` or wandb's default.
        name: the run's display name; default: W&B picks one.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default ``WANDB_MODE`` or online.
        log_model: log the saved model as an artifact at the end of fit.
        **init_kwargs: more arguments for ``wandb.init`` (``entity``, ``tags``, ``group``, ``dir`` ...).

    Raises:
        ImportError: wandb is not installed (``pip install wandb``).

    >>> import lanterna as ln
    >>> ln.callbacks.WandbLogger(project="demo", mode="offline")
    WandbLogger(project='demo', name=None, mode='offline')
    """

    _who = "WandbLogger"

    def __init__(self, project: str | None = None, name: str | None = None, mode: str | None = None,
                 log_model: bool = True, **init_kwargs: Any) -> None:
        super().__init__(log_model)
        for arg, value in (("project", project), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise LanternaError(f"WandbLogger({arg}={value!r}): give a string (or None for the default).")
        if mode not in (None, "online", "offline", "disabled"):
            raise LanternaError(f"WandbLogger(mode={mode!r}): give 'online', 'offline' or 'disabled' "
                                "(or None: WANDB_MODE, else online).")
        for reserved in ("id", "resume", "config", "project", "name", "mode"):
            if reserved in init_kwargs:
                raise LanternaError(f"WandbLogger(..., {reserved}=...): lanterna sets it (the run id comes from "
                                    "the AutoResume checkpoint); remove it.")
        self._wandb = _require("wandb", "WandbLogger")
        self.project, self.name, self.mode = project, name, mode
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def _init(self, **kwargs: Any) -> str:
        self.run = self._wandb.init(project=self.project, name=self.name, mode=self.mode, reinit="create_new",
                                    **self.init_kwargs, **kwargs)
        return str(self.run.id)

    def _open(self, ctx: Context) -> str:
        return self._init(config=fit_params(ctx))

    def _reopen(self, ctx: Context, run_id: str) -> str:
        run_id = self._init(id=run_id, resume="allow", config=fit_params(ctx))
        step = int(getattr(self.run, "step", 0) or 0)  # online: the step after the last one logged
        self._logged = max(self._logged, step - 1)
        return run_id

    def _log(self, metrics: dict[str, float], epoch: int) -> None:
        self.run.log(metrics, step=epoch)

    def _log_model(self, folder: Path) -> None:
        artifact = self._wandb.Artifact(f"model-{self.run.id}", type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def _close(self, ctx: Context, status: str) -> None:
        run, self.run = self.run, None
        run.summary["lanterna_status"] = ctx.status
        run.finish(exit_code=_EXIT_CODE[status])

    def __repr__(self) -> str:
        return f"WandbLogger(project={self.project!r}, name={self.name!r}, mode={self.mode!r})"

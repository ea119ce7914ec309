"""pytorch-ignite: ``create_supervised_trainer`` (its default output reads ``loss.item()`` every batch) with
the epoch loss and metric attached to the trainer, and ``create_supervised_evaluator`` run on the validation
data at every epoch end."""

from __future__ import annotations

from typing import Any

from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
from ignite.metrics import Accuracy, Average, Loss, MeanAbsoluteError
from torch.utils.data import DataLoader
from workloads import Workload, datasets, seeded_model


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    train_ds, valid_ds = datasets(w, data)
    train = DataLoader(train_ds, batch_size=w.batch_size, shuffle=True)
    valid = DataLoader(valid_ds, batch_size=w.batch_size)
    model = seeded_model(w)
    loss_fn = w.loss_fn()
    metric_cls = MeanAbsoluteError if w.metric == "mae" else Accuracy
    trainer = create_supervised_trainer(
        model, w.make_optimizer(model.parameters()), loss_fn,
        output_transform=lambda x, y, y_pred, loss: (y_pred, y, loss.item()),
    )
    Average(output_transform=lambda o: o[2]).attach(trainer, "train_loss")
    if w.validate:
        metric_cls(output_transform=lambda o: (o[0], o[1])).attach(trainer, "train_metric")
        evaluator = create_supervised_evaluator(model, metrics={"loss": Loss(loss_fn), "metric": metric_cls()})
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run(valid))
    trainer.run(train, max_epochs=w.epochs)
    m = trainer.state.metrics
    out = {"train_loss": float(m["train_loss"])}
    if w.validate:
        v = evaluator.state.metrics
        out.update(train_metric=float(m["train_metric"]), valid_loss=float(v["loss"]),
                   valid_metric=float(v["metric"]))
    return out

"""Classification metrics: accuracies and AUROC — exact over the epoch."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from .base import LanternaMetric, _add_sum_states, _check_same_shape, per_sample

__all__ = ["Accuracy", "BinaryAccuracy", "BinaryAccuracyWithLogits", "BinaryAUROC", "MulticlassAUROC"]


class _Correct(LanternaMetric):
    name, display_name = "acc", "Acc"
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        _add_sum_states(self, "correct", "count")

    supports_weight = True

    def _count(self, hits: Tensor, keep: Tensor | None = None, weight: Tensor | None = None) -> None:
        if keep is not None:  # a mask, not indexing: no device synchronisation
            hits = hits & keep
        w = per_sample(weight, hits)
        if w is None:
            self.correct += hits.sum(dtype=torch.float64)
            self.count += hits.numel() if keep is None else keep.sum(dtype=torch.float64)
        else:
            self.correct += (hits * w).sum(dtype=torch.float64)
            self.count += (w * (1 if keep is None else keep)).expand(hits.shape).sum(dtype=torch.float64)

    def compute(self) -> Tensor:
        return (self.correct / self.count).float()


_BINARY_HINT = ("For a model with one output unit use ln.metrics.BinaryAccuracyWithLogits() (logits) or "
                "ln.metrics.BinaryAccuracy() (probabilities).")


class Accuracy(_Correct):
    """Multiclass accuracy: argmax of the scores (N, C, ...) against class indices (N, ...), or class
    predictions against class indices (both integer, same shape).

    Args:
        ignore_index: a target value whose samples are left out (as in torchmetrics), e.g. -100.

    >>> import torch
    >>> from lanterna.metrics import Accuracy
    >>> m = Accuracy(); m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    >>> float(m.compute())
    0.5
    >>> m = Accuracy(ignore_index=-100); m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, -100]))
    >>> float(m.compute())
    1.0
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample."""
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] == 1:
                raise ShapeMismatchError(
                    f"Accuracy: scores of shape {tuple(pred.shape)} have one column, whose argmax is always class "
                    f"0 (targets {tuple(target.shape)}). {_BINARY_HINT}"
                )
            if pred.shape[:1] + pred.shape[2:] != target.shape:
                raise ShapeMismatchError(
                    f"Accuracy: scores of shape {tuple(pred.shape)} do not fit targets of shape "
                    f"{tuple(target.shape)}: scores (N, C, ...) go with class indices (N, ...)."
                )
            pred = pred.argmax(dim=1)
        elif pred.shape != target.shape:
            raise ShapeMismatchError(
                f"Accuracy: predictions of shape {tuple(pred.shape)} and targets of shape {tuple(target.shape)} do "
                "not match: pass scores (N, C) with class indices (N,), or class indices of the targets' shape."
            )
        elif pred.is_floating_point():
            raise ShapeMismatchError(
                f"Accuracy: float predictions of the targets' shape {tuple(pred.shape)} are not class indices; "
                f"Accuracy takes scores (N, C) with class indices (N,). {_BINARY_HINT}"
            )
        hits = pred == target
        self._count(hits, None if self.ignore_index is None else target != self.ignore_index, weight)


class BinaryAccuracy(_Correct):
    """Binary accuracy of probabilities: ``pred > threshold`` against 0/1 targets (float or int).

    Args:
        threshold: probabilities above it count as class 1.

    >>> import torch
    >>> from lanterna.metrics import BinaryAccuracy
    >>> m = BinaryAccuracy(); m.update(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 0]))
    >>> round(float(m.compute()), 4)
    0.6667
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample."""
        _check_same_shape(type(self).__name__, pred, target)
        self._count((pred > self.threshold) == (target > 0.5), None, weight)


class BinaryAccuracyWithLogits(BinaryAccuracy):
    """Binary accuracy of logits: ``sigmoid(pred) > threshold`` against 0/1 targets.

    Args:
        threshold: probabilities (after the sigmoid) above it count as class 1.

    >>> import torch
    >>> from lanterna.metrics import BinaryAccuracyWithLogits
    >>> m = BinaryAccuracyWithLogits(); m.update(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]))
    >>> float(m.compute())
    0.5
    """

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample."""
        super().update(torch.sigmoid(pred), target, weight)


def _auroc(scores: Tensor, positive: Tensor, weight: Tensor | None = None) -> Tensor:
    """Exact area under the ROC curve: the (weighted) Mann-Whitney statistic, tied scores counting one half
    (what trapezoids through every threshold give, as in scikit-learn, ``sample_weight`` included). NaN when one
    class is absent."""
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    pos = positive[order]
    if weight is None:
        counts = counts.double()
        mid_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based average rank of each group of tied scores
        n_pos = pos.sum(dtype=torch.float64)
        n_neg = scores.numel() - n_pos
        auc = (mid_rank[inverse][pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    else:  # per group of tied scores: Σ w⁺ · (w⁻ below the group + ½ w⁻ in it)
        w = weight.double()[order]
        groups = counts.numel()
        w_pos = torch.zeros(groups, dtype=torch.float64, device=w.device).index_add_(0, inverse, w * pos)
        w_neg = torch.zeros(groups, dtype=torch.float64, device=w.device).index_add_(0, inverse, w * ~pos)
        n_pos, n_neg = w_pos.sum(), w_neg.sum()
        below = w_neg.cumsum(0) - w_neg
        auc = (w_pos * (below + w_neg / 2)).sum() / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))


class _Ranked(LanternaMetric):
    """AUROC needs every score of the epoch: concatenated states (exact, reduced by gathering)."""

    name, display_name = "auroc", "AUC"
    higher_is_better = True

    supports_weight = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")  # sample weights, when given

    def _cat(self) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self.preds:
            raise ValueError(f"{type(self).__name__}.compute() before any update(): there are no scores to rank.")
        weights = torch.cat(self.weights) if self.weights else None
        return torch.cat(self.preds), torch.cat(self.targets), weights

    def _keep_weight(self, weight: Tensor | None) -> None:
        if weight is not None:
            self.weights.append(weight.detach().reshape(-1).double())


class BinaryAUROC(_Ranked):
    """Area under the ROC curve for binary targets (exact, ties averaged); ``from_logits=True`` for raw scores
    (the ranking, hence the value, is the same: logits are kept as they are, with no sigmoid to saturate).
    NaN when the epoch has only one class.

    Args:
        from_logits: the predictions are raw scores (logits), not probabilities.

    >>> import torch
    >>> from lanterna.metrics import BinaryAUROC
    >>> m = BinaryAUROC(); m.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    >>> float(m.compute())
    0.75
    """

    def __init__(self, from_logits: bool = False) -> None:
        super().__init__()
        self.from_logits = from_logits

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample (of a (N,) or (N, 1) score)."""
        _check_same_shape("BinaryAUROC", pred, target)
        self.preds.append(pred.detach().float().reshape(-1))
        self.targets.append(target.reshape(-1) > 0.5)
        if weight is not None:
            self._keep_weight(weight.reshape(-1, 1).expand(pred.shape[0], pred[0].numel() if pred.dim() else 1))

    def compute(self) -> Tensor:
        preds, targets, weights = self._cat()
        return _auroc(preds, targets, weights).float()


class MulticlassAUROC(_Ranked):
    """One-vs-rest AUROC over ``num_classes`` classes from probabilities (N, C), or logits (any value outside
    [0, 1]: a softmax is applied, as torchmetrics does): ``average="macro"`` (the mean over
    classes), ``"weighted"`` (by each class's number of samples), ``"micro"`` (one AUROC of all the one-vs-rest
    scores flattened, as scikit-learn's ``roc_auc_score(onehot, scores, average="micro")``) or None (one value
    per class). A class absent from the epoch's targets has no AUROC (NaN) and is left out of the averages.

    Args:
        num_classes: the number of classes C.
        average: ``"macro"``, ``"weighted"``, ``"micro"`` or None (one value per class).

    Raises:
        ShapeMismatchError: when the targets are not class indices of shape (N,) for scores of shape (N, C).

    >>> import torch
    >>> from lanterna.metrics import MulticlassAUROC
    >>> m = MulticlassAUROC(num_classes=2)
    >>> m.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]))
    >>> float(m.compute())
    1.0
    """

    def __init__(self, num_classes: int, average: str | None = "macro") -> None:
        super().__init__()
        if average not in ("macro", "weighted", "micro", None, "none"):
            raise ValueError(f"MulticlassAUROC(average={average!r}): use 'macro', 'weighted', 'micro' or None.")
        self.num_classes = num_classes
        self.average = average

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample."""
        if pred.dim() != 2 or pred.shape[1] != self.num_classes:
            raise ValueError(
                f"MulticlassAUROC(num_classes={self.num_classes}) needs scores of shape (N, {self.num_classes}); "
                f"got {tuple(pred.shape)}."
            )
        if target.shape != pred.shape[:1]:
            raise ShapeMismatchError(
                f"MulticlassAUROC: targets of shape {tuple(target.shape)} do not fit scores of shape "
                f"{tuple(pred.shape)}: the targets are class indices of shape ({pred.shape[0]},)."
            )
        self.preds.append(pred.detach().float())
        self.targets.append(target.reshape(-1).long())
        self._keep_weight(weight)

    def compute(self) -> Tensor:
        preds, targets, w = self._cat()
        if bool(((preds < 0) | (preds > 1)).any()):  # logits: one-vs-rest ranks need probabilities (softmax)
            preds = preds.softmax(dim=1)
        if self.average == "micro":
            onehot = targets.unsqueeze(1) == torch.arange(self.num_classes, device=targets.device)
            flat_w = None if w is None else w.unsqueeze(1).expand(-1, self.num_classes).reshape(-1)
            return _auroc(preds.reshape(-1), onehot.reshape(-1), flat_w).float()
        per_class = torch.stack([_auroc(preds[:, c], targets == c, w) for c in range(self.num_classes)])
        if self.average in (None, "none"):
            return per_class.float()
        defined = ~per_class.isnan()
        counted = torch.ones_like(targets, dtype=torch.float64) if w is None else w
        support = torch.zeros(self.num_classes, dtype=torch.float64, device=targets.device).index_add_(
            0, targets.clamp(0, self.num_classes - 1), counted)
        weights = defined.double() if self.average == "macro" else support * defined
        return ((per_class.nan_to_num() * weights).sum() / weights.sum()).float()

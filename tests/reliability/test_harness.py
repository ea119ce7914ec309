"""The fault-table harness classifies each kind of outcome as issue #11 defines (one row per class), so a
table's verdicts can be trusted."""

from __future__ import annotations

import pickle
import time
import warnings
from typing import Any

import pytest
from harness import CLASSES, CLEAR, CORRECT, EXECUTED, HANG, LOST, RAW, SILENT, Env, Lost, Row, Wrong, classify, forked
from shared import fit

import lanterna as ln


def typed(env: Env) -> None:
    raise ln.DataError("The training data is empty (0 samples).")


def typed_unclear(env: Env) -> None:
    raise ln.DataError("something went wrong")


def raw(env: Env) -> None:
    raise IndexError("index 3 is out of bounds for dimension 0 with size 3")


def checked(env: Env) -> None:
    env.notes.append("weights equal")


def wrong(env: Env) -> None:
    raise Wrong("loss 0.5 != 0.25")


def hangs(env: Env) -> None:
    time.sleep(5)


def child_hangs(env: Env) -> None:
    forked(lambda: time.sleep(5), timeout=0.3).reraise()


def child_typed(env: Env) -> None:
    forked(lambda: typed(env)).reraise()


def lost(env: Env) -> None:
    raise Lost("model no longer loads")


class _Payload:
    def __init__(self, marker: Any) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def executed(env: Env) -> None:
    pickle.loads(pickle.dumps(_Payload(env.markers / "pwned")))  # noqa: S301 - the payload under test
    raise ln.ArtifactError("refused (too late)")


def late(env: Env) -> None:
    fit(epochs=1)
    raise ln.DataError("validation data has the wrong shape")


def warns(env: Env) -> None:
    warnings.warn("AutoResume: the data differ", stacklevel=1)


def post_wrong(env: Env) -> None:
    (env.tmp / ".x.lanterna-tmp-1").write_text("")


def _post(env: Env) -> None:
    if any(env.tmp.iterdir()):
        raise Wrong("temp file left")


CASES = [
    (Row("typed-naming", typed, ("empty",)), CLEAR),
    (Row("typed-not-naming", typed_unclear, ("empty",)), RAW),
    (Row("raw", raw), RAW),
    (Row("checked", checked, expect=CORRECT), CORRECT),
    (Row("wrong", wrong, expect=CORRECT), SILENT),
    (Row("hang", hangs, timeout=0.3), HANG),
    (Row("child-hang", child_hangs), HANG),
    (Row("child-typed", child_typed, ("empty",)), CLEAR),
    (Row("lost", lost), LOST),
    (Row("executed", executed, ("refused",)), EXECUTED),
    (Row("late", late, ("shape",), max_steps=0), RAW),
    (Row("within-max-steps", late, ("shape",), max_steps=8), CLEAR),
    (Row("warns", warns, ("data",), warn=True), CLEAR),
    (Row("no-warning", checked, ("data",), warn=True), SILENT),
    (Row("post-wrong", post_wrong, expect=CORRECT, post=_post), SILENT),
]


@pytest.mark.parametrize(("row", "cls"), CASES, ids=[r.id for r, _ in CASES])
def test_harness_classifies(row: Row, cls: str) -> None:
    assert cls in CLASSES
    outcome = classify(row)
    assert outcome.cls == cls, outcome.message

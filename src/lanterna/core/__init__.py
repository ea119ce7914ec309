"""The engine of a fit: the loop (:mod:`~lanterna.core.loop`), a batch's step (:mod:`~lanterna.core.step`),
the ``ctx`` it shares with callbacks (:mod:`~lanterna.core.context`), hooks, losses, first-batch checks and
the accelerator. Nothing is re-exported here: import from the submodules (the public names are on ``lanterna``).
"""

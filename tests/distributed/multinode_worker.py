"""One user script for tests/distributed/test_multinode.py, run unchanged by one ``torchrun --standalone
--nproc_per_node=2`` launch and by two ``torchrun --nnodes=2 --nproc_per_node=1`` launches (a simulated
2-node job).

Usage: multinode_worker.py OUT_DIR

Every rank writes ``rank_{RANK}.json`` (the launch environment it saw, its history, evaluate's metrics) and
``rank_{RANK}.safetensors`` (its final weights and its predictions), so that the test can compare every rank
of one launch with the same rank of the other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import N_TRAIN, Net, toy_data  # noqa: E402

import lanterna as ln  # noqa: E402

EPOCHS = 4
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    x, y = toy_data()
    train, valid = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    fitted = (
        ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
        .set_opt_hparams(lr=0.01)
        .fit(train, valid_data=valid, epochs=EPOCHS, seed=1, verbose=False,
             dataloader_options={"batch_size": 50, "shuffle": True})
    )
    evaluation = fitted.evaluate(valid)
    preds = fitted.predict(valid[0])
    tensors = {f"weight.{k}": v.detach().contiguous() for k, v in fitted.model.state_dict().items()}
    tensors["preds"] = preds.contiguous()
    save_file(tensors, str(out / f"rank_{rank}.safetensors"))
    (out / f"rank_{rank}.json").write_text(json.dumps({
        "env": {k: os.environ.get(k) for k in ENV},
        "history": fitted.history,
        "evaluate": evaluation.metrics,
    }))


if __name__ == "__main__":
    main()

"""NeuroFlux from Python, notebook style: plan a model object under a memory
budget, train it, compare with backpropagation, keep the final model.

    python examples/api_quickstart.py                 # the shipped Fashion-MNIST subset
    NEUROFLUX_LIMIT=512,256 python examples/api_quickstart.py   # a few hundred images (CI)

Nothing here needs a model file: the model is an ordinary nn.Module object
and the data ordinary datasets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import neuroflux

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_cnn import SmallCNN  # noqa: E402 - any nn.Module works; this is the demo's network
from zoo import fmnist  # noqa: E402 - (train, val) TensorDatasets of the shipped subset

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs") / "api-quickstart"


def main() -> None:
    torch.manual_seed(0)
    train_set, val_set = fmnist()
    model = SmallCNN()

    # 1. Plan: blocks, per-block batch sizes and aux heads under a 16 MB budget.
    plan = neuroflux.plan(model, budget="16MB", input_shape=(1, 28, 28), train_size=len(train_set),
                          val_size=len(val_set), epochs=2, max_batch=128)
    plan.save(OUT / "plan.json")
    print(f"plan: {len(plan.blocks)} blocks, batches {[b.batch_size for b in plan.blocks]}, predicted "
          f"{plan.predicted.time_s:.0f} s; BP fits batch {plan.baseline.bp.batch_size}")

    # 2. Train it, and BP under the same budget, on the same data.
    nf = neuroflux.train(plan, model, train_set, val_set, out=OUT / "neuroflux", export_onnx=False)
    bp = neuroflux.train(plan, model, train_set, val_set, out=OUT / "bp", method="bp", export_onnx=False)
    for name, r in (("NeuroFlux", nf), ("BP", bp)):
        s = r.summary
        print(f"{name:9s}: val accuracy {s['final_accuracy']:.4f}, {s['final_params']:,} params, "
              f"{s['wall_time_s']:.1f} s")

    # 3. The final model is an ordinary module: save it, use it.
    torch.save(nf.model, OUT / "final_model_full.pt")
    x, y = val_set[0]
    print(f"exit {nf.summary['final_exit']}: predicts {nf.model(x[None]).argmax(1).item()} for a sample of "
          f"class {int(y)}; saved {OUT / 'final_model_full.pt'}")


if __name__ == "__main__":
    main()

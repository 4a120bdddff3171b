"""A trainable model file for a network of kuangliu/pytorch-cifar (MIT): a
network nobody here wrote, on real data.

    python benchmarks/pytorch_cifar_model.py --repo PATH MobileNetV2 --dir /tmp/kl
    nf-bench --models /tmp/kl/mobilenetv2.py --budgets 200MB --epochs 2 --limit 10000,2000 \\
        --data ../shared/data/fashion_mnist.npz --methods neuroflux bp bp-checkpoint

PATH is a checkout of https://github.com/kuangliu/pytorch-cifar or its bare git
directory; its ``models/`` folder is exported into ``--dir``/nf-pytorch-cifar
(from HEAD, for a git directory; a folder of that name is replaced only if this
script wrote it) and imported from there, never copied into this repository.
Run it as a script (it imports its sibling ``cifar_networks``).
The model file builds the network with the constructor its ``main.py`` uses
(``benchmarks/cifar_networks.py``'s list) and trains it on Fashion-MNIST
zero-padded to 32x32 with the grey channel repeated three times (the
networks take 3x32x32 CIFAR images). ``NEUROFLUX_DATA`` names the .npz, as
for every model file; without it the repository's shipped subset is used.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from cifar_networks import EXTRA, NETWORKS, models_root

SUBSET = Path(__file__).resolve().parents[1] / "examples" / "data" / "fashion_mnist_small.npz"
#: The exported copy of the repository's ``models/`` (inside ``--dir``), and the file marking it as ours.
EXPORT_DIR, EXPORT_MARK = "nf-pytorch-cifar", "EXPORTED_BY_NEUROFLUX"

MODEL_FILE = """\
\"\"\"kuangliu/pytorch-cifar's {name} (commit {commit}), imported from {root}, trained
on Fashion-MNIST at 3x32x32. Written by benchmarks/pytorch_cifar_model.py.\"\"\"

import sys

sys.path.insert(0, {root!r})
from models import *  # noqa: E402,F401,F403 - kuangliu/pytorch-cifar

from neuroflux.runtime.datasets import fashion_mnist  # noqa: E402

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def model():
    return {ctor}


def datasets():
    return fashion_mnist({subset!r}, pad_to=32, channels=3)
"""


def write_model_file(name: str, repo: Path, out_dir: Path) -> Path:
    """Export ``models/`` into ``out_dir`` and write ``out_dir/<name>.py``."""
    known = {**NETWORKS, **EXTRA}
    if name not in known:
        raise SystemExit(f"unknown network {name!r}; known: {', '.join(known)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = (out_dir / EXPORT_DIR).resolve()
    if dest.exists():
        # Only ever replace a folder this script exported (never, say, the checkout itself).
        if not (dest / EXPORT_MARK).is_file():
            raise SystemExit(f"{dest} exists and was not written by this script; choose another --dir")
        shutil.rmtree(dest)
    with tempfile.TemporaryDirectory(prefix="nf-cifar-") as tmp:
        root, commit = models_root(repo.resolve(), Path(tmp))
        shutil.copytree(root / "models", dest / "models")
    (dest / EXPORT_MARK).write_text(f"exported from {repo.resolve()} at commit {commit}\n")
    path = out_dir / f"{name.lower()}.py"
    path.write_text(MODEL_FILE.format(name=name, commit=commit, root=str(dest), ctor=known[name], subset=str(SUBSET)))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("network", help=f"one of: {', '.join([*NETWORKS, *EXTRA])}")
    ap.add_argument("--repo", required=True, help="kuangliu/pytorch-cifar checkout or bare git directory")
    ap.add_argument("--dir", required=True, help="folder for the model file and the exported models/")
    args = ap.parse_args(argv)
    print(write_model_file(args.network, Path(args.repo), Path(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

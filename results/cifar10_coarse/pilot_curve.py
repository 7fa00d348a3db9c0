"""The pilot's curve: running train top-1, val top-1, R^2 and the coarse-to-fine probe per epoch.

Reads what the project's scripts wrote for the pilot (results/cifar10_coarse/README.md gives the
commands) and writes pilot_curve.md and pilot_curve.png next to this file:

  python results/cifar10_coarse/pilot_curve.py
"""
import csv
import os

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PILOT = os.path.join(HERE, "pilot")


def epoch_of(label):
    """'epoch009' -> 9; the finished run ('softmax_s0') -> None (its epoch is the last)."""
    return int(label[5:]) if label.startswith("epoch") else None


def main():
    with open(os.path.join(PILOT, "softmax_s0", "summary.csv")) as f:
        rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
    last = max(rows)
    sep = np.load(os.path.join(PILOT, "class_separation", "class_separation.npz"))
    layers = list(sep["layers"])
    r2 = {epoch_of(str(l)) or last: float(v)
          for l, v in zip(sep["checkpoints"], sep["r2"][:, layers.index("pool")])}
    probe = {}
    with open(os.path.join(PILOT, "probe", "summary.csv")) as f:
        for r in csv.DictReader(f):
            probe[epoch_of(r["checkpoint"]) or last] = float(r["test_accuracy"])
    epochs = sorted(r2)
    table = ["| epoch | running train top-1 | val top-1 (EMA) | R^2 (pool, train) | "
             "coarse-to-fine probe, test top-1 |", "|---|---|---|---|---|"]
    for e in epochs:
        table.append(f"| {e} | {100 * float(rows[e]['train_top1']):.1f} | "
                     f"{100 * float(rows[e]['val_top1']):.1f} | {r2[e]:.3f} | "
                     f"{100 * probe[e]:.1f} |")
    with open(os.path.join(HERE, "pilot_curve.md"), "w") as f:
        f.write("# The pilot: softmax, 30 epochs, snapshots every 3 epochs\n\n"
                "Written by pilot_curve.py. Train top-1 is the running accuracy of the epoch's "
                "augmented batches (raw weights); val top-1 the EMA weights' on the 5,000 held-out "
                "source images; R^2 on 1,000 training images per coarse class; the probe is the "
                "linear probe (SPEC protocol) on the 10 fine labels of CIFAR-10's test images.\n\n"
                + "\n".join(table) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    all_e = sorted(rows)
    ax[0].plot(all_e, [100 * float(rows[e]["train_top1"]) for e in all_e], label="train (running)")
    ax[0].plot(all_e, [100 * float(rows[e]["val_top1"]) for e in all_e], label="val (EMA)")
    ax[0].plot(epochs, [100 * probe[e] for e in epochs], "o-", label="coarse-to-fine probe")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("top-1 (%)")
    ax[0].legend(frameon=False)
    ax[1].plot(epochs, [r2[e] for e in epochs], "o-", color="black")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("class separation R^2 (pool)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "pilot_curve.png"), dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""What a ResNet-50 last.pt costs at an epoch end: the snapshot that stays on the training path
(train_imagenet.snapshot) against the checksum, serialization and fsync that now run in the
background (common.make_checkpoint + common.save_checkpoint).

    python benchmarks/bench_checkpoint.py [--out /tmp/ck_bench.pt] [--repeat 3]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_imagenet as ti  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ck_bench.pt", help="the file written (then removed)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = common.build_model("softmax", 1000, "resnet50")
    opt = torch.optim.SGD(common.param_groups(model, "softmax", 8e-5), lr=0.1, momentum=0.9,
                          nesterov=True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()                              # momentum buffers exist, as in a real last.pt
    ema = ti.ema_new(model)
    args = {"objective": "softmax", "hparams": {}, "arch": "resnet50", "num_classes": 1000,
            "small_input": False}
    try:
        for _ in range(a.repeat):
            t = time.perf_counter()
            parts = ti.snapshot({"model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": opt.state_dict()})
            snap = time.perf_counter() - t
            t = time.perf_counter()
            common.save_checkpoint(a.out, common.make_checkpoint(
                parts["model"], args, ema=parts["ema"], optimizer=parts["optimizer"]))
            write = time.perf_counter() - t
            print(f"snapshot {snap:.3f} s (on the training path), checksum + save + fsync "
                  f"{write:.3f} s (background), {os.path.getsize(a.out) / 1e6:.0f} MB")
    finally:
        if os.path.exists(a.out):
            os.remove(a.out)


if __name__ == "__main__":
    main()

"""Measurement: how far the eval preprocessing moves a network's test top-1.

Scores one checkpoint on its test split three ways (train_imagenet.evaluate, EMA weights):
  torchvision        the project's default (images <= 64 px: resize only, no crop)
  torchvision_crop   common.eval_transform with the 0.875 centre crop, antialiased bicubic
  tf                 import_tf_checkpoint.tf_eval_transform: the same crop, TF1 resize_bicubic
torchvision_crop against tf isolates the resampler (TF1's has no half-pixel offset); torchvision
against torchvision_crop the crop. Only real ImageNet and the released networks measure what
matters for them (downsampling, where antialiasing counts); this runs on what is at hand.

    .venv/bin/python benchmarks/bench_eval_preprocessing.py \\
        --checkpoint ../main/results/cifar10_coarse/runs/pilot/softmax_s0/final.pt
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import import_tf_checkpoint as itc  # noqa: E402
import train_imagenet  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="default: the network's training data")
    args = p.parse_args()
    model, network = common.load_pretrained(args.checkpoint)
    data = common.load_dataset(args.data or network["dataset"])
    res = common.input_resolution(None, network)
    test = data["test"]
    ways = {"torchvision": None,
            "torchvision_crop": common.eval_transform(res, 0.875),
            "tf": itc.tf_eval_transform(res, 0.875)}
    out = {"checkpoint": args.checkpoint, "dataset": data["spec"], "resolution": res,
           "count": len(test), "threads": torch.get_num_threads()}
    for name, transform in ways.items():
        t0 = time.perf_counter()
        m = train_imagenet.evaluate({"m": model}, test, res, transform=transform)["m"]
        out[name] = {"top1": m["top1"], "top5": m["top5"],
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(name, out[name], flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

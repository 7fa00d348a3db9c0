"""Benchmark: import_tf_checkpoint.py on a full-size ResNet-50 checkpoint.

Without --checkpoint it first writes a synthetic one laid out like the released files: raw
weights, EMA shadows and Momentum slots of every variable of the official graph (names from
tests/fixtures/resnet50_names.json, 3 x 102 MB) plus global_step, with the test suite's bundle
writer. Then it times convert() (read the index, read and crc-check only the 320 EMA tensors by
offset, map them, build the model) and save_checkpoint(), --repeats times; the page cache is
warm after the first run, so the first run is also reported.

    .venv/bin/python benchmarks/bench_import_tf.py
    .venv/bin/python benchmarks/bench_import_tf.py --checkpoint /tmp/tfwork/softmax/seed3/model.ckpt
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import common  # noqa: E402
import import_tf_checkpoint as itc  # noqa: E402
import test_import_tf_checkpoint as t  # noqa: E402


def write_synthetic(prefix):
    ns = t.names_shapes("dense")
    tensors = {}
    for seed, suffix in ((1, ""), (0, t.EMA), (2, "/Momentum")):
        tensors.update({n + suffix: v for n, v in t.gen.synthetic_weights(ns, seed).items()})
    tensors["global_step"] = np.int64(0)
    t.write_bundle(prefix, tensors)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a TF checkpoint prefix (default: write a synthetic one)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.checkpoint
        if prefix is None:
            prefix = os.path.join(tmp, "softmax", "seed0", "model.ckpt")
            start = time.time()
            write_synthetic(prefix)
            print(f"wrote a synthetic checkpoint in {time.time() - start:.1f} s")
        size = os.path.getsize(prefix + ".data-00000-of-00001")
        print(f"{prefix}: data file {size / 1e6:.0f} MB")
        for i in range(args.repeats):
            start = time.time()
            ck = itc.convert(prefix)
            mid = time.time()
            common.save_checkpoint(os.path.join(tmp, "out.pt"), ck)
            end = time.time()
            print(f"run {i + 1}: convert {mid - start:.2f} s, save {end - mid:.2f} s, "
                  f"total {end - start:.2f} s")


if __name__ == "__main__":
    main()

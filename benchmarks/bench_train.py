"""train_imagenet.py's training throughput against the fixed reference loop, side by side.

  python benchmarks/bench_train.py                 # CPU: ResNet-18, CIFAR-10 npz, 32 px, batch 128
  python benchmarks/bench_train.py --rounds 5 --steps 40
  python benchmarks/bench_train.py --gpu           # the prepared GPU run (ResNet-50, bf16)

CPU (default): both run the same model (torchvision ResNet-18, standard stem), batch, data (the
CIFAR-10 training npz files), augmentation (random-resized crop, bicubic, flip) and precision
(fp32), each as its own process with its own defaults otherwise: the reference
(../shared/bench/reference_train_loop.py, written as torchvision's references/classification
train.py trains) and `train_imagenet.py --bench train` (this project's real training loop:
loader, device-side normalization, SGD step, EMA update; no evaluation or checkpoint). The runs
alternate, ROUNDS times, so machine noise hits both alike; the ratio is of the medians.

GPU (--gpu): `train_imagenet.py --bench synthetic` (random uint8 batches on the device) for
ResNet-50 bf16 channels_last at 224 and 160 px, with and without torch.compile, and the
reference loop (--data synthetic, its own loader) on the same GPU at 224 px.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def images_per_second(cmd, threads=None):
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    m = re.search(r"images_per_second=([0-9.]+)", r.stdout)
    if r.returncode or not m:
        sys.exit(f"error: {' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr[-2000:]}")
    return float(m.group(1)), time.perf_counter() - t


def cpu(a):
    data = f"npz:{a.data}"
    common = ["--arch", a.arch, "--resolution", str(a.resolution),
              "--batch-size", str(a.batch_size)]
    ref = [sys.executable, a.reference, *common, "--data", data, "--steps", str(a.steps),
           "--warmup", "5", "--device", "cpu", "--amp", "off"]
    ours = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--bench", "train", *common,
            "--data", data, "--no-small-input", "--augment", "paper", "--flip",
            "--precision", "fp32", "--bench-steps", str(a.steps), "--device", "cpu"]
    print(f"reference: {' '.join(ref)}\nours:      {' '.join(ours)}\nthreads: "
          f"{a.threads or 'torch default'}", flush=True)
    rates = {"reference": [], "ours": []}
    for r in range(a.rounds):
        for name, cmd in (("reference", ref), ("ours", ours)) if r % 2 == 0 else \
                         (("ours", ours), ("reference", ref)):
            ips, wall = images_per_second(cmd, a.threads)
            rates[name].append(ips)
            print(f"round {r + 1}: {name:9s} {ips:8.1f} images/s ({wall:.0f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    per_round = [o / r for o, r in zip(rates["ours"], rates["reference"])]
    print(f"median images/s: ours {med['ours']:.1f}, reference {med['reference']:.1f}; "
          f"ratio {med['ours'] / med['reference']:.2f} (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)})")


def gpu(a):
    ours = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--bench", "synthetic",
            "--arch", "resnet50", "--batch-size", str(a.batch_size), "--precision", "bf16",
            "--channels-last", "--bench-steps", str(a.steps), "--device", "cuda"]
    results = {}
    for res in (224, 160):
        for comp in ("--compile", "--no-compile"):
            ips, wall = images_per_second([*ours, "--resolution", str(res), comp])
            results[(res, comp)] = ips
            print(f"ours {res}px {comp:13s} {ips:8.1f} images/s ({wall:.0f} s)", flush=True)
    ref = [sys.executable, a.reference, "--arch", "resnet50", "--data", "synthetic",
           "--resolution", "224", "--batch-size", str(a.batch_size), "--steps", str(a.steps),
           "--device", "cuda", "--amp", "bf16", "--workers", str(os.cpu_count() or 8)]
    ips, wall = images_per_second(ref)
    print(f"reference 224px          {ips:8.1f} images/s ({wall:.0f} s)")
    best = max(results[(224, "--compile")], results[(224, "--no-compile")])
    print(f"ratio at 224 px (ours best / reference): {best / ips:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the prepared GPU run instead of the CPU one")
    p.add_argument("--reference", default=os.path.join(SHARED, "bench", "reference_train_loop.py"))
    p.add_argument("--data", default=os.path.join(SHARED, "data", "cifar10"),
                   help="npz folder with *train*.npz (CPU run)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per run (after 5 warmup steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's)")
    a = p.parse_args()
    if not os.path.exists(a.reference):
        sys.exit(f"error: reference loop not found: {a.reference}; pass --reference PATH")
    if a.gpu:
        a.batch_size, a.steps = a.batch_size or 256, a.steps or 50
        return gpu(a)
    if not os.path.isdir(a.data):
        sys.exit(f"error: npz data folder not found: {a.data}; pass --data DIR")
    a.batch_size, a.steps = a.batch_size or 128, a.steps or 30
    cpu(a)


if __name__ == "__main__":
    main()

"""train_imagenet.py's training throughput against the fixed reference loop, side by side.

  python benchmarks/bench_train.py                 # CPU: ResNet-18, CIFAR-10 npz, 32 px, batch 128
  python benchmarks/bench_train.py --rounds 5 --steps 40
  python benchmarks/bench_train.py --gpu           # the prepared GPU run (ResNet-50, bf16)
  python benchmarks/bench_train.py --loader --data-spec imagenet:/data/imagenet --batch-size 256

CPU (default): both run the same model (torchvision ResNet-18, standard stem), batch, data (the
CIFAR-10 training npz files), augmentation (random-resized crop, bicubic, flip) and precision
(fp32), each as its own process with its own defaults otherwise: the reference
(../shared/bench/reference_train_loop.py, written as torchvision's references/classification
train.py trains) and train_imagenet.py itself, run for 5 + STEPS optimizer steps (--steps) with a
log line every 5 steps: its images/s is read from log.jsonl over the timed steps (after the first
5), so what is measured is the real training loop (loader, device-side normalization, SGD step,
EMA update), with no benchmark code inside it. The runs alternate, ROUNDS times, so machine noise
hits both alike; the ratio is of the medians.

GPU (--gpu): synthetic() below (train_imagenet.train_step and ema_update on random uint8 batches
already on the device) for ResNet-50 bf16 channels_last at 224 and 160 px, with and without
torch.compile, and the reference loop (--data synthetic, its own loader) on the same GPU at 224 px.

--loader: the training loader alone (train_imagenet.train_loader: decode, augment, collate, copy
to the device), images/s.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, ROOT)


def images_per_second(cmd, threads=None):
    """Run a command that prints images_per_second=X; (X, wall seconds)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    m = re.search(r"images_per_second=([0-9.]+)", r.stdout)
    if r.returncode or not m:
        sys.exit(f"error: {' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr[-2000:]}")
    return float(m.group(1)), time.perf_counter() - t


def training_rate(cmd, warmup_steps, batch_size, threads=None):
    """Run train_imagenet.py (cmd without --out) in a scratch folder; images/s over the log
    intervals after `warmup_steps`, from its log.jsonl. (rate, wall seconds)"""
    out = tempfile.mkdtemp(prefix="bench_train_")
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    try:
        t = time.perf_counter()
        r = subprocess.run([*cmd, "--out", out], cwd=ROOT, capture_output=True, text=True,
                           env=env)
        wall = time.perf_counter() - t
        if r.returncode:
            sys.exit(f"error: {' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr[-2000:]}")
        with open(os.path.join(out, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if '"loss"' in line]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    images = seconds = 0.0
    for prev, rec in zip(log, log[1:]):
        if prev["step"] >= warmup_steps:
            n = (rec["step"] - prev["step"]) * batch_size
            images += n
            seconds += n / rec["images_per_second"]
    return images / seconds if seconds else float("nan"), wall


def cpu(a):
    data = f"npz:{a.data}"
    common = ["--arch", a.arch, "--resolution", str(a.resolution),
              "--batch-size", str(a.batch_size)]
    ref = [sys.executable, a.reference, *common, "--data", data, "--steps", str(a.steps),
           "--warmup", "5", "--device", "cpu", "--amp", "off"]
    ours = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *common, "--data", data,
            "--no-small-input", "--augment", "paper", "--flip", "--precision", "fp32",
            "--epochs", "1", "--steps", str(5 + a.steps), "--log-every", "5",
            "--ckpt-minutes", "1e9", "--device", "cpu"]
    print(f"reference: {' '.join(ref)}\nours:      {' '.join(ours)}\nthreads: "
          f"{a.threads or 'torch default'}", flush=True)
    rates = {"reference": [], "ours": []}
    for r in range(a.rounds):
        for name in ("reference", "ours") if r % 2 == 0 else ("ours", "reference"):
            if name == "ours":
                ips, wall = training_rate(ours, 5, a.batch_size, a.threads)
            else:
                ips, wall = images_per_second(ref, a.threads)
            rates[name].append(ips)
            print(f"round {r + 1}: {name:9s} {ips:8.1f} images/s ({wall:.0f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    per_round = [o / r for o, r in zip(rates["ours"], rates["reference"])]
    print(f"median images/s: ours {med['ours']:.1f}, reference {med['reference']:.1f}; "
          f"ratio {med['ours'] / med['reference']:.2f} (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)})")
    return med


def synthetic(a, device="cuda", compile_model=True, resolution=224):
    """Training steps (forward, backward, SGD, EMA) of train_imagenet.py on random uint8 images
    already on the device, normalized there as real batches are: the model's throughput without
    any loader. Returns images/s."""
    import torch
    import common
    import train_imagenet as ti
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _, autocast = ti.amp_dtype("bf16" if cuda else "fp32", device)
    torch.manual_seed(0)
    model = common.build_model("softmax", 1000, a.arch, small_input=a.small_input).to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(common.param_groups(model, "softmax", 8e-5), lr=0.01, momentum=0.9,
                          nesterov=True, fused=True)
    ema = ti.ema_new(model)
    criterion = common.make_criterion("softmax", 1000)
    net = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (a.batch_size, 3, resolution, resolution), dtype=torch.uint8,
                           generator=gen).to(device)
    labels = torch.randint(0, 1000, (a.batch_size,), generator=gen).to(device)

    def step(i):
        batch = ti.to_device(images, labels, device, channels_last=cuda)
        ti.train_step(net, criterion, opt, None, [batch], autocast)
        ti.ema_update(ema, model, 0.999, i)

    for i in range(5):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(a.steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    return a.steps * a.batch_size / (time.perf_counter() - start)


def loader(a):
    """The training loader alone (decode, augment, collate, copy to the device): images/s."""
    import torch
    import common
    import train_imagenet as ti
    data = common.load_dataset(a.data_spec)
    dist = ti.Dist(device=common.resolve_device("auto"))
    transform = common.train_transform(a.resolution, "paper")
    n = len(data["train"]) // a.batch_size * a.batch_size
    if n == 0:
        sys.exit(f"error: --batch-size {a.batch_size} is larger than the training set")
    if n // a.batch_size < 5 + a.steps:
        sys.exit(f"error: {n // a.batch_size} batches of {a.batch_size}; the loader benchmark "
                 f"needs 5 + --steps ({5 + a.steps})")
    batches, _ = ti.train_loader(data["train"], transform, a.batch_size, n, dist, 0, a.workers)
    seen, start = 0, None
    try:
        for i, (images, labels) in enumerate(batches):
            ti.to_device(images, labels, dist.device)
            if i == 4:
                start, seen = time.perf_counter(), 0
            elif start is not None:
                seen += images.shape[0]
            if start is not None and seen >= a.steps * a.batch_size:
                break
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)
    finally:
        ti.stop_workers(batches)   # they ignore SIGTERM: left to the interpreter's exit, a hang


def gpu(a):
    a.arch, a.small_input = "resnet50", False
    results = {}
    for res in (224, 160):
        for comp in (True, False):
            t = time.perf_counter()
            ips = synthetic(a, "cuda", comp, res)
            results[(res, comp)] = ips
            print(f"ours {res}px compile={comp!s:5s} {ips:8.1f} images/s "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    ref = [sys.executable, a.reference, "--arch", "resnet50", "--data", "synthetic",
           "--resolution", "224", "--batch-size", str(a.batch_size), "--steps", str(a.steps),
           "--device", "cuda", "--amp", "bf16", "--workers", str(os.cpu_count() or 8)]
    ips, wall = images_per_second(ref)
    print(f"reference 224px          {ips:8.1f} images/s ({wall:.0f} s)")
    best = max(results[(224, True)], results[(224, False)])
    print(f"ratio at 224 px (ours best / reference): {best / ips:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the prepared GPU run instead of the CPU one")
    p.add_argument("--loader", action="store_true", help="time the training loader alone")
    p.add_argument("--reference", default=os.path.join(SHARED, "bench", "reference_train_loop.py"))
    p.add_argument("--data", default=os.path.join(SHARED, "data", "cifar10"),
                   help="npz folder with *train*.npz (CPU run)")
    p.add_argument("--data-spec", default="digits", help="--loader: a dataset spec")
    p.add_argument("--workers", type=int, default=1, help="--loader: loader processes")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--small-input", action="store_true")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per run (after 5 warmup steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: torch's)")
    a = p.parse_args(argv)
    if a.loader:
        a.batch_size, a.steps = a.batch_size or 128, a.steps or 20
        rate = loader(a)
        print(f"images_per_second={rate:.2f}")
        return rate
    if not os.path.exists(a.reference):
        sys.exit(f"error: reference loop not found: {a.reference}; pass --reference PATH")
    if a.gpu:
        a.batch_size, a.steps = a.batch_size or 256, a.steps or 50
        return gpu(a)
    if not os.path.isdir(a.data):
        sys.exit(f"error: npz data folder not found: {a.data}; pass --data DIR")
    a.batch_size, a.steps = a.batch_size or 128, a.steps or 30
    return cpu(a)


if __name__ == "__main__":
    main()

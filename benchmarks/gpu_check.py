"""The prepared GPU check: run it once on a new machine before a long study (about 5 minutes on
one GPU). It writes one JSON file and prints what it measured.

    bash benchmarks/gpu_check.sh                      # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out gpu_check.json --jpeg ../shared/data/clothing_jpeg
    python benchmarks/gpu_check.py --smoke            # the same code paths on the CPU, tiny

Four measurements, each through the project's own code:
  model_step      training steps of train_imagenet.train_step + EMA on random uint8 batches
                  already on the GPU: ResNet-50, bf16, channels_last, torch.compile, batch 256,
                  224 px (images/s; the GPU's ceiling, no loader)
  input_pipeline  train_imagenet.train_loader alone with the default workers
                  (common.default_workers): TorchCodec decode, the paper's random-resized crop
                  and flip, collate, copy to the GPU, on an image folder of real photos at about
                  ImageNet's size built from --jpeg (images/s; should exceed model_step)
  real_loop       train_imagenet.py itself for 200 steps on that folder (images/s from its
                  log.jsonl, after the first 20 steps: compile and warm-up excluded)
  resume          a run stopped by SIGTERM saves last.pt and exits 143, and the same command
                  resumes from it
Expected on one H100 (not yet measured; BENCHMARKS.md records each real run): model_step
several thousand images/s; input_pipeline at least model_step with 16 cores; real_loop within
about 10% of the smaller of the two.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_folder(jpeg, out, per_class):
    """An image folder of real JPEG photos: --jpeg's files (copied round-robin to per_class per
    class), or, without it, smooth synthetic 500 x 375 JPEGs."""
    import glob
    import numpy as np
    from PIL import Image
    files = sorted(glob.glob(os.path.join(jpeg, "*", "*", "*.jpg"))) if jpeg else []
    classes = ("a", "b") if not files else sorted({os.path.basename(os.path.dirname(f))
                                                    for f in files})
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2), ("test", 2)):
        for c in classes:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
            mine = [f for f in files if os.path.basename(os.path.dirname(f)) == c]
            for i in range(n):
                dst = os.path.join(out, split, c, f"{i}.jpg")
                if mine:
                    shutil.copyfile(mine[i % len(mine)], dst)
                else:
                    im = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((25, 25, 1)))
                    Image.fromarray(im.astype(np.uint8)).save(dst, quality=90)
    return f"folder:{out}"


def log_rate(out, after_step):
    """images/s over log.jsonl's intervals after `after_step`."""
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"loss"' in l]
    rows = [r for r in rows if r["step"] > after_step]
    if len(rows) < 2:
        return None
    images = sum(r["images_per_second"] for r in rows[1:]) / (len(rows) - 1)
    return images


def train_cmd(a, data, out, steps, extra=()):
    return [sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--data", data, "--out", out,
            "--arch", a.arch, "--resolution", str(a.resolution), "--batch-size", str(a.batch_size),
            "--epochs", "1000", "--steps", str(steps), "--log-every", "10", "--ckpt-minutes", "0",
            *(["--device", "cpu"] if a.smoke else []), *extra]


def resume_check(a, data, scratch):
    """SIGTERM a run once it has logged a step, then rerun the same command: it must resume."""
    out = os.path.join(scratch, "resume")
    cmd = train_cmd(a, data, out, 10 ** 6, ["--no-compile", "--log-every", "2"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "log.jsonl")) and log_rate(out, 0) is not None:
            break
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    saved = os.path.exists(os.path.join(out, "last.pt"))
    again = subprocess.run(train_cmd(a, data, out, 6, ["--no-compile", "--force-resume",
                                                      "--log-every", "2"]),
                           cwd=ROOT, capture_output=True, text=True)
    resumed = "resumed at step" in again.stdout
    return {"sigterm_exit": proc.returncode, "saved_last_pt": saved, "resumed": resumed,
            "ok": proc.returncode in (143, -15) and saved and resumed,
            "output_tail": (text[-500:] if proc.returncode not in (143, -15) else "")}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    p.add_argument("--jpeg", default=os.path.join(ROOT, "..", "shared", "data", "clothing_jpeg"),
                   help="a folder of JPEG photos as split/class/*.jpg (else synthetic photos)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, ResNet-18, 64 px, batch 8, a few steps: the code paths only")
    a = p.parse_args()
    import torch
    import common
    import bench_train
    a.arch, a.resolution, a.batch_size = ("resnet18", 64, 8) if a.smoke else ("resnet50", 224, 256)
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --smoke for the CPU code paths")
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    result = {"device": "cpu" if a.smoke else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cores": common.cpu_cores(),
              "workers": common.default_workers("cpu" if a.smoke else "cuda")[0]}
    try:
        t = time.perf_counter()
        bench = argparse.Namespace(arch=a.arch, small_input=False, batch_size=a.batch_size,
                                   steps=3 if a.smoke else 30)
        result["model_step_images_per_second"] = bench_train.synthetic(
            bench, "cpu" if a.smoke else "cuda", compile_model=not a.smoke,
            resolution=a.resolution)
        print(f"model step: {result['model_step_images_per_second']:.0f} img/s "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        data = build_folder(a.jpeg if os.path.isdir(a.jpeg) else None,
                            os.path.join(scratch, "data"), 40 if a.smoke else 1200)
        t = time.perf_counter()
        bench = argparse.Namespace(data_spec=data, resolution=a.resolution,
                                   batch_size=a.batch_size, steps=3 if a.smoke else 30,
                                   workers=result["workers"])
        result["input_pipeline_images_per_second"] = bench_train.loader(bench)
        print(f"input pipeline ({result['workers']} workers): "
              f"{result['input_pipeline_images_per_second']:.0f} img/s "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        t = time.perf_counter()
        out = os.path.join(scratch, "loop")
        steps, warm = (6, 2) if a.smoke else (200, 20)
        r = subprocess.run(train_cmd(a, data, out, steps, ["--log-every", "2"] if a.smoke else []),
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the real loop failed: {r.stderr[-1500:]}")
        result["real_loop_images_per_second"] = log_rate(out, warm)
        result["real_loop_seconds"] = time.perf_counter() - t
        print(f"real loop, {steps} steps: {result['real_loop_images_per_second']} img/s "
              f"({result['real_loop_seconds']:.0f} s)", flush=True)
        result["resume"] = resume_check(a, data, scratch)
        print(f"SIGTERM save and resume: {'ok' if result['resume']['ok'] else 'FAILED'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")
    if not result.get("resume", {}).get("ok"):
        sys.exit("error: the SIGTERM save and resume check failed (see the JSON)")


if __name__ == "__main__":
    main()

"""Input pipeline per CPU core: this kit's training transform against torchvision's reference.

    python benchmarks/bench_input.py --data folder:../shared/data/clothing_jpeg

One process, one thread, the same image files, the two pipelines alternating in rounds so that
the machine's noise hits both alike; the paper's training transform at --resolution (224):
  ours       common._read_image (TorchCodec's JPEG decoder, PIL for the rest), then
             common.train_transform("paper"): RandomResizedCrop (bicubic, antialiased) and a flip
             on the uint8 tensor; normalization happens on the device (train_imagenet.to_device)
  reference  torchvision references/classification/presets.py's ClassificationPresetTrain:
             PIL open and convert, RandomResizedCrop (bicubic), flip, PILToTensor,
             ConvertImageDtype(float), Normalize
The last line: `input pipeline: ours N img/s per core, reference M img/s per core, ratio R`.
"""
import argparse
import os
import sys
import time

import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def reference_transform(resolution):
    from PIL import Image
    tf = T.Compose([T.RandomResizedCrop(resolution, interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.PILToTensor(), T.ConvertImageDtype(torch.float),
                    T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])

    def load(path):
        with Image.open(path) as im:
            return tf(im.convert("RGB"))
    return load


def our_transform(resolution):
    tf = common.train_transform(resolution, "paper")
    return lambda path: tf(common._read_image(path))


def rate(load, paths):
    start = time.perf_counter()
    for p in paths:
        load(p)
    return len(paths) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an image-folder dataset spec, folder:DIR")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds over every image")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = common.load_dataset(a.data)
    src = data["train"].source
    paths = list(src.paths)
    if not paths:
        sys.exit("error: --data must be an image folder (folder:DIR), not in-memory images")
    ours, ref = our_transform(a.resolution), reference_transform(a.resolution)
    torch.manual_seed(0)
    rate(ours, paths[:20]), rate(ref, paths[:20])          # warm up: imports, caches
    r_ours, r_ref = [], []
    for i in range(a.rounds):
        r_ours.append(rate(ours, paths))
        r_ref.append(rate(ref, paths))
        print(f"round {i + 1}/{a.rounds}: ours {r_ours[-1]:.0f} img/s, reference "
              f"{r_ref[-1]:.0f} img/s", flush=True)
    o, r = sorted(r_ours)[len(r_ours) // 2], sorted(r_ref)[len(r_ref) // 2]   # medians
    print(f"{len(paths)} images of {a.data}, {a.resolution} px, medians of {a.rounds} rounds, "
          f"torch threads 1")
    print(f"input pipeline: ours {o:.0f} img/s per core, reference {r:.0f} img/s per core, "
          f"ratio {o / r:.2f}")


if __name__ == "__main__":
    main()

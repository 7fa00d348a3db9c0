"""Benchmark: cka_analysis.py's minibatch CKA vs the layer-pair-at-a-time approach of torch-cka.

Two networks of one architecture (seeds 0 and 1, random weights with randomized BatchNorm so every
residual branch matters), 1,000 digits images upsampled to 64 px, batches of 250. The activations
of every layer (block1..blockN, pool, logits) are computed once and stored; then, from the same
stored activations, side by side:
  ours       cka_analysis.MinibatchCKA: per batch one Gram matrix per (network, layer), U-centred
             in float64, all pairs from one stacked product (it also gets the within-network pairs).
             Like cka_analysis.py with the hook outputs, it may centre the activations in place, so
             it gets copies of them (made before the clock starts)
  reference  torch-cka 0.21 (PyPI) CKA.compare, fed the stored activations through stand-in models
             whose named submodules emit them: per layer pair it recomputes the second Gram matrix
             and three 3-term unbiased HSICs (float32, K @ L products), batches weighted equally.
             Without torch-cka: a faithful re-implementation of that loop (`pair_at_a_time`).
  exact      the same estimator as torch-cka (3-term unbiased HSIC, equal batch weights), written
             independently in float64 with each Gram matrix computed once: the value check.
With equal batches, ours and torch-cka estimate the same quantity, so values must agree.

    /work/main/.venv/bin/python -m pip install --no-deps --target /tmp/torchcka torch-cka tqdm
    .venv/bin/python benchmarks/bench_cka.py                    # resnet18 and resnet50
    .venv/bin/python benchmarks/bench_cka.py --archs resnet18 --images 500
torch-cka is looked for in --torch-cka-path (default /tmp/torchcka) and on sys.path; it is never
a project requirement.
"""
import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # torch-cka's progress bar
import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cka_analysis import MinibatchCKA, pass_views  # noqa: E402


def make_model(arch, seed):
    torch.manual_seed(seed)
    model = common.build_model("softmax", 10, arch=arch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
    return model.eval()


def stored_activations(models, loader, layers):
    """[[{layer: float32 (B, D)} per batch] per model], from common.extract_features."""
    out = [[] for _ in models]
    for images, labels in loader:
        for i, model in enumerate(models):
            for feats, _ in common.extract_features(model, [(images, labels)], layers):
                out[i].append(feats)
    return out


def fresh_copies(acts):
    """What cka_analysis.py's update gets from the forward hooks: activations it may overwrite."""
    return [[{l: t.clone() for l, t in batch.items()} for batch in a] for a in acts]


def ours(acts, layers):
    """Consumes acts (fresh copies): each batch is centred in place, then dropped."""
    acc = MinibatchCKA()
    for b in range(len(acts[0])):
        acc.update((a[b][l] for a in acts for l in layers), overwrite=True)
        for a in acts:
            a[b] = None
    L = len(layers)
    return acc.cka()[:L, L:]


class Replay(nn.Module):
    """A stand-in model for torch-cka: input = batch index; submodule `layer` emits the stored
    activations of that layer, so torch-cka's forward hooks see exactly them."""

    def __init__(self, batches, layers, dtype=torch.float32):
        super().__init__()
        self.batches, self.layers, self.dtype = batches, layers, dtype
        for layer in layers:
            self.add_module(layer, nn.Identity())

    def forward(self, index):
        feats = self.batches[int(index)]
        for layer in self.layers:
            getattr(self, layer)(feats[layer].to(self.dtype))


def torch_cka_reference(torch_cka, acts, layers, dtype=torch.float32):
    """torch-cka's CKA.compare on the stored activations; dtype=float64 runs its own code in
    float64 (default dtype switched, so its torch.ones and accumulators follow)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.arange(len(acts[0]))), batch_size=1)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cka = torch_cka.CKA(Replay(acts[0], layers, dtype), Replay(acts[1], layers, dtype),
                                "net0", "net1", model1_layers=layers, model2_layers=layers,
                                device="cpu")
            cka.compare(loader, loader)
    finally:
        torch.set_default_dtype(default)
    return cka.export()["CKA"].double().numpy()


def _hsic_3term(K, L):
    """torch-cka's _HSIC (Nguyen et al. 2021 eq. 3) on Gram matrices with zeroed diagonal."""
    n = K.shape[0]
    ones = torch.ones(n, 1, dtype=K.dtype)
    result = torch.trace(K @ L)
    result += ((ones.t() @ K @ ones @ ones.t() @ L @ ones) / ((n - 1) * (n - 2))).item()
    result -= ((ones.t() @ K @ L @ ones) * 2 / (n - 2)).item()
    return (1 / (n * (n - 3)) * result).item()


def pair_at_a_time(acts, layers, dtype=torch.float32):
    """torch-cka's compare loop, re-implemented: one layer pair at a time, the second network's
    Gram matrix recomputed for every pair; used when torch-cka is not installed."""
    L, nb = len(layers), len(acts[0])
    hsic = torch.zeros(L, L, 3, dtype=dtype)
    for b in range(nb):
        for i, l1 in enumerate(layers):
            X = acts[0][b][l1].to(dtype).flatten(1)
            K = X @ X.t()
            K.fill_diagonal_(0.0)
            hsic[i, :, 0] += _hsic_3term(K, K) / nb
            for j, l2 in enumerate(layers):
                Y = acts[1][b][l2].to(dtype).flatten(1)
                Lg = Y @ Y.t()
                Lg.fill_diagonal_(0)
                hsic[i, j, 1] += _hsic_3term(K, Lg) / nb
                hsic[i, j, 2] += _hsic_3term(Lg, Lg) / nb
    return (hsic[:, :, 1] / (hsic[:, :, 0].sqrt() * hsic[:, :, 2].sqrt())).double().numpy()


def exact(acts, layers):
    """The same estimator in float64, each Gram matrix once, HSICs kept in float64."""
    L, nb = len(layers), len(acts[0])
    cross, self0, self1 = np.zeros((L, L)), np.zeros(L), np.zeros(L)
    for b in range(nb):
        grams = []
        for a in acts:
            gs = []
            for layer in layers:
                x = a[b][layer].double().flatten(1)
                g = x @ x.T
                g.fill_diagonal_(0)
                gs.append(g)
            grams.append(gs)
        n = grams[0][0].shape[0]
        ones = torch.ones(n, dtype=torch.float64)

        def hsic(K, Lg):
            return float((torch.trace(K @ Lg) + (ones @ K @ ones) * (ones @ Lg @ ones)
                          / ((n - 1) * (n - 2)) - 2 / (n - 2) * (ones @ K @ (Lg @ ones)))
                         / (n * (n - 3)))
        for i in range(L):
            self0[i] += hsic(grams[0][i], grams[0][i]) / nb
            self1[i] += hsic(grams[1][i], grams[1][i]) / nb
            for j in range(L):
                cross[i, j] += hsic(grams[0][i], grams[1][j]) / nb
    return cross / np.sqrt(np.outer(self0, self1))


def import_torch_cka(path):
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)
    try:
        import torch_cka
        return torch_cka
    except ImportError as e:
        print(f"torch-cka not importable ({e}); the reference is the re-implementation "
              f"pair_at_a_time (install: pip install --no-deps --target /tmp/torchcka "
              f"torch-cka tqdm)")
        return None


def bench(arch, args, torch_cka):
    data = common.load_dataset("digits")
    view = pass_views(data["train"], args.images, 1)[0]
    loader = common.eval_loader(view, args.resolution, args.batch_size)
    models = [make_model(arch, 0), make_model(arch, 1)]
    layers = common.layer_names(models[0])
    t = time.perf_counter()
    acts = stored_activations(models, loader, layers)
    t_fwd = time.perf_counter() - t
    dims = {l: acts[0][0][l].shape[1] for l in layers}
    mb = sum(d for d in dims.values()) * len(view) * 2 * 4 / 2**20
    print(f"\n{arch}: {len(view)} images at {args.resolution} px, {len(acts[0])} batches of "
          f"{args.batch_size}, {len(layers)} layers x 2 networks = {len(layers) ** 2} cross pairs, "
          f"{mb:.0f} MiB of stored activations, {torch.get_num_threads()} threads")
    print(f"  forward passes (both networks, stored): {t_fwd:7.2f} s")

    name = (f"torch-cka {getattr(torch_cka, '__version__', '?')} CKA.compare" if torch_cka
            else "pair_at_a_time (torch-cka's loop)")
    times_ours, times_ref = [], []
    for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
        copies = fresh_copies(acts)
        t = time.perf_counter()
        ours_cka = ours(copies, layers)
        times_ours.append(time.perf_counter() - t)
        del copies
        t = time.perf_counter()
        ref_cka = (torch_cka_reference(torch_cka, acts, layers) if torch_cka
                   else pair_at_a_time(acts, layers))
        times_ref.append(time.perf_counter() - t)
    t_ours, t_ref = min(times_ours), min(times_ref)
    print(f"  ours (MinibatchCKA, all pairs):          {t_ours:7.2f} s  (runs: "
          f"{', '.join(f'{t:.2f}' for t in times_ours)})")
    print(f"  reference ({name}): {t_ref:7.2f} s  (runs: "
          f"{', '.join(f'{t:.2f}' for t in times_ref)})")
    exact_cka = exact(acts, layers)
    d_ours = np.abs(ours_cka - exact_cka).max()
    d_ref = np.abs(ref_cka - exact_cka).max()
    d_both = np.abs(ours_cka - ref_cka).max()
    print(f"  speed-up on the CKA computation (fastest runs): {t_ref / t_ours:.1f}x "
          f"(target >= 5x); "
          f"end to end with the forward passes: {(t_fwd + t_ref) / (t_fwd + t_ours):.1f}x")
    print(f"  max |ours - exact float64| = {d_ours:.1e} (target <= 1e-5); "
          f"max |reference - exact| = {d_ref:.1e}; max |ours - reference| = {d_both:.1e}")
    if args.torch_cka_float64 and torch_cka is not None:
        ref64 = torch_cka_reference(torch_cka, acts, layers, torch.float64)
        print(f"  torch-cka's own code in float64: max |torch-cka64 - exact| = "
              f"{np.abs(ref64 - exact_cka).max():.1e}, max |ours - torch-cka64| = "
              f"{np.abs(ref64 - ours_cka).max():.1e}")
    print("  same-layer CKA (ours): " + " ".join(f"{v:.3f}" for v in np.diag(ours_cka)))
    return t_ref / t_ours, d_ours


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=250,
                   help="divide --images evenly, so torch-cka's equal batch weights match ours")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each side, interleaved; the fastest of each is compared")
    p.add_argument("--torch-cka-path", default="/tmp/torchcka")
    p.add_argument("--torch-cka-float64", action="store_true",
                   help="also run torch-cka's own code in float64 (slow): shows its float32 "
                        "deviation is rounding, not a different estimator")
    args = p.parse_args()
    torch_cka = import_torch_cka(args.torch_cka_path)
    results = {arch: bench(arch, args, torch_cka) for arch in args.archs}
    print("\nsummary: " + "; ".join(f"{a}: {r:.1f}x faster, max diff {d:.1e}"
                                    for a, (r, d) in results.items()))


if __name__ == "__main__":
    main()

"""Minibatch linear CKA between every layer of every network (SPEC.md, "Representation analyses").

All checkpoints run over the same images in the same order (the augmentation-free eval transform).
At every layer (block1..blockN, pool, logits; conv maps flattened) each batch gives one Gram
matrix per (checkpoint, layer), U-centred in float64; one stacked product then gives the unbiased
HSIC (Song et al. 2012) of every pair of (checkpoint, layer) x (checkpoint, layer) at once. The
HSICs are averaged over batches (weighted by batch size, so equal batches weigh equally) and
normalized at the end: minibatch CKA (Nguyen, Raghu, Kornblith 2021). Memory depends on the batch
size and the number of (checkpoint, layer) combinations, never on the number of images.

    python cka_analysis.py --checkpoint runs/softmax_s0/final.pt runs/softmax_s1/final.pt \\
        runs/sigmoid_s0/final.pt --data imagenet:/data/imagenet --split test --out results/cka
    python cka_analysis.py --checkpoint a.pt b.pt --data digits --out /tmp/cka --layers pool,logits
    python cka_analysis.py --checkpoint paper:softmax/seed0 paper:softmax/seed1 \\
        paper:sigmoid/seed0 --data imagenet:/data/imagenet --out results/cka_paper
    python cka_analysis.py --checkpoint torchvision:resnet50:IMAGENET1K_V1 b.pt --data digits \\
        --resolution 224 --max-images 500 --out /tmp/cka

All checkpoints must have been trained at the same resolution (or pass --resolution). Pass 1 goes
over the data in order; with --passes P, passes 2..P use seeded random orders, so the minibatches
differ from pass to pass (Nguyen et al. average over several). Batches of fewer than 4 images
(the estimator needs 4) are skipped and counted.

Output DIR/cka.json: common.result_header first (kind "cka", networks: the identity of every
checkpoint in the arrays' order, dataset: the spec of the images, dataset_name), then split,
layers, resolution, n_images (per pass), n_batches, passes and `same_layer` {layer: M x M nested
list} (null where undefined). DIR/cka.npz: `cka` (M, M, L, L) with cka[a, b, i, j] = CKA(layer i
of checkpoint a, layer j of checkpoint b); `layers` (L,); `checkpoints` and `run_ids` (M,; ''
where none) in the same order as cka.json's networks; the counts.

Importable:
    from cka_analysis import linear_cka, MinibatchCKA
    linear_cka(x, y)                    # Kornblith et al. 2019 (biased HSIC), feature-space form
    linear_cka(x, y, debiased=True)     # the unbiased HSIC estimator
    acc = MinibatchCKA()
    for batch in ...: acc.update([x1, x2, ...])   # any number of (n, p_g) arrays, same n
    acc.cka()                           # (G, G) float64
"""
import dataclasses
import itertools
import os
import signal
import sys
import time

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# CKA (copyable: torch and numpy only; bad input raises ValueError)

def _matrix(x, name):
    """An (n, p) array or tensor as a float64 CPU tensor (conv maps are flattened)."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    t = t[:, None] if t.ndim == 1 else t.flatten(1)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return t


def gram(x, overwrite=False):
    """(n, n) Gram matrix of the column-centred rows of x (a tensor, any device), in x's float
    dtype. Centring first removes a large common offset (post-ReLU features) before a float32
    product (U-centring is invariant to it, so only rounding changes: about 1e-9 instead of 1e-7
    in CKA on ResNet activations). overwrite=True centres x in place, saving a copy of it."""
    x = x.flatten(1)
    if not x.is_floating_point():
        x, overwrite = x.float(), True
    if x.is_inference() and not torch.is_inference_mode_enabled():
        overwrite = False  # inference tensors can only be changed in place in inference mode
    mean = torch.full((1, x.shape[0]), 1 / x.shape[0], dtype=x.dtype, device=x.device) @ x
    x = x.sub_(mean) if overwrite else x - mean
    return x @ x.T


def u_centre(k):
    """U-centre symmetric Gram matrices (..., n, n) in float64 (Szekely & Rizzo 2014): zero the
    diagonal, subtract row and column means with the U-statistic denominators. Then
    <U(K), U(L)> / (n (n - 3)) is the unbiased HSIC estimator of Song et al. (2012).
    A float64 input is centred in place and returned."""
    k = k.double()
    n = k.shape[-1]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    means = k.sum(-1) / (n - 2)
    means -= means.sum(-1, keepdim=True) / (2 * (n - 1))
    k -= means[..., :, None]
    k -= means[..., None, :]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def linear_cka(x, y, debiased=False):
    """Linear CKA of two (n, p) arrays or tensors (same n, any p), as a float.

    Biased (debiased=False): Kornblith et al. 2019, ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    in feature space (the equal n x n Gram form when a side has more features than examples).
    Debiased: the unbiased HSIC estimator (Song et al. 2012) from U-centred Gram matrices."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same number of rows, got {n} and {y.shape[0]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} examples, got {n}")
    if not debiased and max(x.shape[1], y.shape[1]) <= n:     # feature space
        xc, yc = x - x.mean(0), y - y.mean(0)
        num = (yc.T @ xc).pow(2).sum()
        den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    else:                                                      # n x n Gram matrices
        k, l = (u_centre(gram(v)) if debiased else gram(v) for v in (x, y))
        num, den = (k * l).sum(), k.norm() * l.norm()
    if den <= 0:
        raise ValueError("CKA is undefined: x or y is constant over the examples")
    return float(num / den)


class MinibatchCKA:
    """Accumulates minibatch CKA between G feature sets (Nguyen, Raghu, Kornblith 2021).

    update(features) takes G (n, p_g) tensors or arrays (same n, any p_g, any device; may be a
    generator, so only one set needs to be alive at a time); with overwrite=True it may centre
    the given tensors in place (for throwaway activations: saves a copy of each). Per batch: one
    Gram matrix per set, U-centred in float64, then all G x G unbiased HSICs from one stacked
    product. The HSICs are summed weighted by n; cka() normalizes them:
    CKA = HSIC(a, b) / sqrt(HSIC(a, a) HSIC(b, b)).
    Memory: G Gram matrices of n x n float64 for one batch, plus the G x G sums."""

    def __init__(self):
        self.hsic = None        # (G, G) float64: sum over batches of n * HSIC_unbiased
        self.n_images = 0
        self.n_batches = 0
        self.skipped = 0        # images in batches smaller than 4

    def update(self, features, overwrite=False):
        grams = []
        for f in features:
            f = torch.as_tensor(f)
            if grams and f.shape[0] != grams[0].shape[0]:
                raise ValueError(f"feature sets of one batch differ in size: "
                                 f"{grams[0].shape[0]} and {f.shape[0]} rows")
            if f.shape[0] < 4:
                self.skipped += f.shape[0]
                return
            grams.append(gram(f, overwrite))
            if not torch.isfinite(grams[-1]).all():
                err = ValueError(f"feature set {len(grams) - 1} has NaN or infinite values")
                err.index = len(grams) - 1
                raise err
        if not grams:
            raise ValueError("MinibatchCKA.update got no feature sets")
        n = grams[0].shape[0]
        flat = u_centre(torch.stack(grams)).reshape(len(grams), -1)  # one float64 copy
        del grams
        hsic = flat @ flat.T / (n * (n - 3))
        if not torch.isfinite(hsic).all():
            raise ValueError("HSIC overflowed: activations too large for float64")
        if self.hsic is None:
            self.hsic = torch.zeros_like(hsic)
        elif self.hsic.shape != hsic.shape:
            raise ValueError(f"got {len(hsic)} feature sets, earlier batches had {len(self.hsic)}")
        self.hsic += n * hsic
        self.n_images += n
        self.n_batches += 1

    def cka(self):
        """(G, G) float64 numpy array; NaN where a feature set is constant on every batch."""
        if self.hsic is None:
            raise ValueError("no batch of at least 4 images was accumulated")
        h = (self.hsic / self.n_images).cpu().numpy()
        d = np.sqrt(np.clip(np.diag(h), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = h / np.outer(d, d)
        out[(d == 0)[:, None] | (d == 0)[None, :]] = np.nan
        return out


# ----------------------------------------------------------------------------------------------
# Models and data

try:
    import common   # the kit's shared code, beside this file: the part below needs it
except ImportError:  # this file copied alone: the method above still works (it needs no common)
    common = None


def load_models(names, resolution, device):
    """([(model, network)] for each checkpoint, all on `device`; one common input resolution)."""
    loaded = [common.load_pretrained(n) for n in names]
    sides = [common.input_resolution(resolution, network) for _, network in loaded]
    if len(set(sides)) > 1:
        desc = ", ".join(f"{net['checkpoint']}: {side}" for (_, net), side in zip(loaded, sides))
        raise common.UserError(f"checkpoints were trained at different resolutions ({desc}); "
                               f"CKA needs the same images for all: pass --resolution")
    for model, _ in loaded:
        model.to(device)
    return loaded, sides[0]


def choose_layers(loaded, spec):
    """'all' (every layer; the same list for every model) or a comma list valid for every model."""
    lists = [common.layer_names(m) for m, _ in loaded]
    if spec == "all" and any(l != lists[0] for l in lists):
        desc = ", ".join(f"{net['checkpoint']} ({net['arch']}): {len(l)}" for (_, net), l in
                         zip(loaded, lists))
        raise common.UserError(f"checkpoints have different layer lists ({desc} layers); "
                               f"pass --layers with names they all have, e.g. pool,logits")
    return [common.resolve_layers(m, spec, f"{net['checkpoint']} ({net['arch']})")
            for m, net in loaded][0]


def batch_features(models, images, layers, device):
    """The activations of every (model, layer) for one batch, model by model (a generator, so
    only one model's activations are alive at a time). common.extract_features copies them."""
    for model in models:
        gen = common.extract_features(model, [(images, None)], layers, device)
        try:  # closed even when the consumer stops early: its hooks and inference mode end
            for feats, _ in gen:
                for layer in layers:
                    yield feats.pop(layer)
        finally:
            gen.close()


def pass_views(split, max_images, passes, seed=0):
    """One Split view per pass: the (seeded) image subset, in order, then in random orders."""
    idx = split.indices
    if max_images is not None and max_images < len(idx):
        keep = np.sort(np.random.default_rng(seed).choice(len(idx), max_images, replace=False))
        idx = idx[keep]
    orders = [idx] + [idx[np.random.default_rng(seed + p).permutation(len(idx))]
                      for p in range(1, passes)]
    return [common.Split(split.source, order, split.label_map) for order in orders]


def unique_labels(labels):
    seen, out = {}, []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return out


# ----------------------------------------------------------------------------------------------
# The command-line part

@dataclasses.dataclass
class Comparison:
    """What the script compares: the models (on the device) with their identities and unique
    labels, the layers, the images (a Split view per pass) and their resolution."""
    data: dict
    models: list
    networks: list
    labels: list
    layers: list
    views: list
    resolution: int


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="checkpoint paths (or run folders: their final.pt), "
                        "torchvision:ARCH:WEIGHTS and/or paper:OBJECTIVE/seedK or paper:all "
                        "(the paper's networks, downloaded once); one or more")
    p.add_argument("--data", required=True,
                   help="dataset spec (digits, npz:DIR, imagenet:DIR, ...)")
    p.add_argument("--out", required=True, help="output folder for cka.npz and cka.json")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="the images compared on")
    p.add_argument("--layers", default="all",
                   help="all, or a comma list such as block16,pool,logits")
    p.add_argument("--batch-size", type=common.positive_int, default=256,
                   help="at least 4 (the unbiased HSIC estimator needs 4 images per batch)")
    p.add_argument("--passes", type=common.positive_int, default=1,
                   help="passes over the images (see above)")
    p.add_argument("--max-images", type=common.positive_int, default=None,
                   help="seeded random subset of the split (at least 4; default: all of it)")
    p.add_argument("--resolution", type=common.resolution, default=None,
                   help="input side length (default: the checkpoints' training resolution, "
                        "else 224)")
    p.add_argument("--crop-fraction", type=common.fraction, default=None,
                   help="eval center crop (default 0.875; 1 for in-memory images <= 64 px)")
    p.add_argument("--workers", type=common.worker_count, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the CKA of other checkpoints or settings in --out, or write into "
                        "a folder that holds results of another kind (default: refused)")
    return p.parse_args(argv)


def setup(args):
    """Cheap checks, then the data, the models and the output folder (refused when it holds the
    CKA of other checkpoints or settings)."""
    args.checkpoint = common.checkpoint_names(args.checkpoint)   # cheap checks first
    if args.batch_size < 4:
        raise common.UserError("--batch-size must be at least 4 (the unbiased HSIC estimator "
                               "needs 4 images per batch)")
    if args.max_images is not None and args.max_images < 4:
        raise common.UserError("--max-images must be at least 4")
    args.device = common.resolve_device(args.device)
    data = common.load_dataset(args.data, download=args.download)
    loaded, resolution = load_models(args.checkpoint, args.resolution, args.device)
    networks = [net for _, net in loaded]
    c = Comparison(data, [m for m, _ in loaded], networks,
                   unique_labels([net["checkpoint"] for net in networks]),
                   choose_layers(loaded, args.layers),
                   pass_views(data[args.split], args.max_images, args.passes), resolution)
    common.make_out_dir(args.out, "cka", args.overwrite)
    common.refuse_replacing(os.path.join(args.out, "cka.json"), {
        **header(c, args), "n_images": len(c.views[0]), "passes": args.passes,
        "batch_size": args.batch_size}, ("split", "layers", "resolution", "n_images", "passes",
                                         "batch_size"), args.overwrite, "the CKA")
    return c


def header(c, args):
    return {**common.result_header(c.networks, c.data, "cka"), "split": args.split,
            "layers": c.layers, "resolution": c.resolution}


def accumulate(c, args):
    """MinibatchCKA over every pass: images through every network, a line every
    common.PROGRESS_SECONDS."""
    acc, n_per_pass = MinibatchCKA(), len(c.views[0])
    tick = common.Ticker(f"  features of {len(c.models)} network(s)", n_per_pass * len(c.views))
    for p_i, view in enumerate(c.views):
        loader = common.eval_loader(view, c.resolution, args.batch_size, args.workers,
                                    args.crop_fraction)
        for b, (images, _) in enumerate(common.loader_iter(loader)):
            feats = batch_features(c.models, images, c.layers, args.device)
            try:
                acc.update(feats, overwrite=True)
            except ValueError as e:
                raise common.UserError(not_finite(e, args.checkpoint, c.layers))
            finally:
                feats.close()  # a generator left open inside extract_features would keep
                # torch's inference mode switched on for the rest of the thread
            tick(p_i * n_per_pass + min(n_per_pass, (b + 1) * args.batch_size))
    return acc


def not_finite(error, checkpoints, layers):
    """MinibatchCKA's error in the script's words: which checkpoint and layer, when it says."""
    g = getattr(error, "index", None)
    if g is None:
        return str(error)
    return (f"{checkpoints[g // len(layers)]}: layer {layers[g % len(layers)]} has NaN or "
            f"infinite activations (a diverged or corrupt model?)")


def cka_array(acc, c):
    """(M, M, L, L) with [a, b, i, j] = CKA(layer i of model a, layer j of model b); warns of
    layers whose CKA is undefined (constant activations)."""
    M, L = len(c.models), len(c.layers)
    try:
        cka = acc.cka().reshape(M, L, M, L).transpose(0, 2, 1, 3)
    except ValueError as e:
        raise common.UserError(str(e))
    undefined = sorted({f"{c.labels[a]}:{c.layers[i]}" for a in range(M) for i in range(L)
                        if np.isnan(cka[a, a, i, i])})
    if undefined:
        print(f"warning: constant activations, CKA undefined (NaN) for {', '.join(undefined)}",
              file=sys.stderr)
    return cka


def save(cka, acc, c, args):
    """OUT/cka.npz and OUT/cka.json."""
    counts = {"n_images": len(c.views[0]), "n_images_used": acc.n_images,
              "n_batches": acc.n_batches, "skipped_images": acc.skipped, "passes": args.passes}
    common.save_npz(os.path.join(args.out, "cka.npz"), cka=cka, layers=np.array(c.layers),
                    checkpoints=np.array(c.labels),
                    run_ids=np.array([net["run_id"] or "" for net in c.networks]),
                    resolution=np.int64(c.resolution),
                    **{k: np.int64(v) for k, v in counts.items()})
    same = {layer: [[None if np.isnan(v) else round(float(v), 6) for v in row]
                    for row in cka[:, :, i, i]] for i, layer in enumerate(c.layers)}
    common.save_json(os.path.join(args.out, "cka.json"), {
        **header(c, args), **counts, "batch_size": args.batch_size,
        "estimator": "minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021)",
        "versions": common.versions(), "same_layer": same})


def main(argv=None):
    args = parse_args(argv)
    c = setup(args)
    print(f"CKA of {len(c.models)} checkpoints x {len(c.layers)} layers on {len(c.views[0])} "
          f"images of {args.data} {args.split} at {c.resolution} px, batch {args.batch_size}, "
          f"{args.passes} pass(es), {args.device}", flush=True)
    start = time.time()
    acc = accumulate(c, args)
    cka = cka_array(acc, c)
    save(cka, acc, c, args)
    print(f"done in {time.time() - start:.1f} s ({acc.n_batches} batches, {acc.skipped} images in "
          f"batches < 4 skipped); wrote {args.out}/cka.npz and cka.json")
    for a, b in itertools.combinations(range(len(c.models)), 2):
        vals = " ".join(f"{cka[a, b, i, i]:.3f}" for i in range(len(c.layers)))
        print(f"  {c.labels[a]} vs {c.labels[b]}: {vals}")


if __name__ == "__main__":
    if common is None:
        print("error: the script needs common.py from the kit beside it; the method works "
              "alone: import it", file=sys.stderr)
        raise SystemExit(2)
    common.run_main(main)

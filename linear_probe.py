"""Linear probe: L2-regularized multinomial logistic regression on frozen features (SPEC.md).

For every checkpoint x dataset pair: extract features of one layer (EMA weights when the checkpoint
has them, eval transform, no augmentation) for train / val / test, cache them, then
  1. standardize the features with the training split's mean and standard deviation (the same
     transform for val, test and the train+val refit; --no-standardize to skip),
  2. for each lambda (default 45 log-spaced values in [1e-6, 1e5], strongest first, each solve
     warm-started from the previous one) minimize
         mean cross-entropy + lambda/2 * ||W||_F^2      (bias not penalized;
     scikit-learn's LogisticRegression with C = 1 / (lambda * n_train)) and score val,
  3. refit on train+val at the lambda with the best val metric (ties: the larger lambda),
  4. score test once, with the dataset's metric (top1, or mean_per_class where the dataset says so).

The solver is L-BFGS in torch (CPU or GPU), exact to a relative tolerance: the features are centred
and rotated onto the eigenvectors of their covariance (exact reparametrizations; directions without
variance are dropped), each parameter is scaled by the curvature of its direction (variance x
softmax curvature + lambda), the loss comes from float32 matmuls with float64 per-example losses
and sums, the L-BFGS memory is carried from one lambda to the next, and a lambda is done when the
L-BFGS estimates of what is left would move the logits by less than sqrt(--rtol) of their spread
and the objective by less than --rtol. Memory is O(N D) for the features (float32, in row chunks)
plus O(D^2 + 20 D K) for the solver: no N x N matrix.

Examples:
  python linear_probe.py --checkpoint runs/softmax_s0/final.pt --data digits@5-9 --out runs/probe
  python linear_probe.py --checkpoint runs/*/final.pt --data cifar10:/data/cifar cifar100:/data/cifar \\
      --out runs/probe --layer pool --device cuda
  python linear_probe.py --checkpoint torchvision:resnet50:IMAGENET1K_V2 --data dtd:/data/dtd --out probe
  python linear_probe.py --checkpoint paper:all --data cifar10:/data/cifar --out runs/probe_paper
      # the paper's 72 ResNet-50s, downloaded and converted on first use (import_tf_checkpoint.py)
  python linear_probe.py --features feats.npz --out runs/probe --metric mean_per_class
  python linear_probe.py --checkpoint runs/*/final.pt --data npz:data/clothing --folds 5 --out probe

Prints a line 'pair i of N (eta ...)' as each (checkpoint, dataset) pair starts, feature
extraction's progress every 10 s, and the pair's result; --verbose adds a line per lambda.

Outputs, per pair: OUT/<checkpoint>/<dataset_name>/results.json (for --layer other than pool:
OUT/<checkpoint>/<dataset_name>+<layer>/): common.result_header first (kind "linear_probe",
network: the checkpoint's identity, dataset: the probed spec, dataset_name), then layer,
resolution, metric, test_accuracy, best_lambda, val_curve (lambda -> val metric), the whole
path, sizes and timings; and probe.npz (W, b on the raw features: logits = x @ W + b).
OUT/summary.csv has one row per pair found under OUT: the network's identity, its objective's
hyperparameters (a column each), then the probe's numbers.
Features are cached in --cache (default OUT/cache) as .npz keyed by the checkpoint's content hash,
dataset, split, layer and resolution; a stale or corrupt cache file is detected and rebuilt.
--features FILE.npz probes features you already have, to OUT/<file name>/features/: arrays
train_x, train_y, test_x, test_y and optionally val_x, val_y (otherwise val is a seeded stratified
10% of train, at most 10,000).
--folds K scores a small data set by stratified K-fold cross-validation over all its images
(train, val and test pooled; fold i is tested by the protocol run with fold i+1 as val and the
rest as train); the score is over all pooled predictions, the folds' spread is beside it, and the
results go to OUT/<checkpoint>/<dataset_name>+Kfold/ (probe.npz: one W, b per fold).
"""
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
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


DEFAULT_LAMBDAS = "1e-6:1e5:45"
MAX_LAMBDAS = 1000        # a longer path is a typo: 1e-6:1e5:1000000000 asked for 7.5 GB
ROTATE_MAX_DIM = 4096     # above this feature dimension, scale features instead of rotating them
CACHE_VERSION = 1
# What --features reads; the other flags go with --checkpoint and are refused with it.
FEATURES_USE = {"features", "data", "out", "lambdas", "standardize", "metric", "rtol", "max_iter",
                "device", "folds", "seed", "overwrite", "verbose"}
SUMMARY_COLUMNS = ["dataset", "dataset_name", "layer", "folds", "resolution", "metric",
                   "test_accuracy", "test_top1", "test_mean_per_class", "best_lambda", "best_C",
                   "n_train", "n_val", "n_test", "dim", "num_classes", "seconds"]


# ----------------------------------------------------------------------------------------------
# The protocol (SPEC.md, "Transfer evaluation"): a lambda path scored on val, a refit on
# train+val at the best lambda, test scored once. Needs torch, numpy and the solver below only.

def top1(pred, labels):
    """The default scorer: {'top1': the fraction of predictions equal to the labels}."""
    return {"top1": (pred == labels).double().mean().item()}


@dataclasses.dataclass
class ProbeSettings:
    """The protocol's settings. accuracy(pred, labels) -> {name: float} scores int64 predictions
    against labels (tensors on one device); `metric` names the score that picks lambda and is
    the test accuracy. The default scores top-1 only; the script passes the project's rule
    (common), which adds mean_per_class. log: a line per lambda (None: silent)."""
    lambdas: list
    metric: str = "top1"
    standardize: bool = True
    device: str = "cpu"
    rtol: float = 1e-6
    max_iter: int = 1000
    history: int = 20
    accuracy: object = top1
    log: object = print


def run_probe(train, val, test, num_classes, settings):
    """The whole protocol on (x float32 (N, D), y int64 (N,)) pairs. Returns (results, W, b) with
    W, b float64 for the raw features: logits = x @ W + b.

        s = ProbeSettings(lambdas=[1e-3, 1e-1], log=None)
        results, W, b = run_probe((xtr, ytr), (xva, yva), (xte, yte), 3, s)
        results["test_accuracy"], results["best_lambda"]
    """
    s, K, n_tr = settings, int(num_classes), len(train[0])
    with cpu_threads(small_problem_threads(n_tr, train[0].shape[1], K, s.device)):
        torch.set_flush_denormal(True)
        t = [time.time()]
        X, y, mean, std = standardized(train, val, s)
        prob = prepare(X, n_tr, num_classes=K)
        Z_all = prob.Z
        full_rank = Z_all is X or prob.V is None
        prob = dataclasses.replace(prob, Z=Z_all[:n_tr], y=y[:n_tr])
        t.append(time.time())
        path, (lam, best_val, u) = sweep(prob, (Z_all[n_tr:], y[n_tr:]), s)
        t.append(time.time())
        if full_rank:      # the train basis spans train+val too: refit on the stacked rows
            whole = dataclasses.replace(prob, Z=Z_all, y=y)
        else:              # rank-deficient train rows (X is intact): prepare train+val afresh
            whole = prepare(X, len(X), y, K)
        refit, W, b = solve_from(whole, lam, to_input_coords(prob, u), s)
        t.append(time.time())
        del X, Z_all, prob, whole
        W_raw = W / std[:, None]               # the probe on raw (unstandardized) features
        b_raw = b - (mean / std) @ W
        yte = torch.as_tensor(np.asarray(test[1], dtype=np.int64)).to(y.device)
        pred = predict(torch.as_tensor(test[0]).to(y.device), W_raw, b_raw)
    results = {
        **scored(s.accuracy(pred, yte), s.metric),
        "best_lambda": lam, "best_C": 1 / (lam * len(y)), "best_val": best_val,
        "val_curve": {f"{p['lambda']:.6g}": p["val"] for p in path}, "path": path,
        "refit": refit, "n_train": n_tr, "n_val": len(y) - n_tr, "n_test": len(yte),
        "dim": len(mean), "num_classes": K, "standardize": s.standardize, "rtol": s.rtol,
        "device": str(y.device),
        "solver_seconds": {"prepare": t[1] - t[0], "sweep": t[2] - t[1], "refit": t[3] - t[2],
                           "total": time.time() - t[0]}}
    return results, W_raw, b_raw


def scored(scores, metric):
    """The results' scores: the metric, its value as test_accuracy, then every score."""
    return {"metric": metric, "test_accuracy": scores[metric],
            **{f"test_{name}": value for name, value in scores.items()}}


def standardized(train, val, settings):
    """(X, y, mean, std): train and val rows stacked on the device, X float32 standardized with
    the train rows' float64 mean and std (unless not settings.standardize: mean 0, std 1)."""
    (xtr, ytr), (xva, yva) = train, val
    n_tr, d = len(xtr), xtr.shape[1]
    dev = torch.device(settings.device)
    X = torch.empty(n_tr + len(xva), d, dtype=torch.float32, device=dev)
    X[:n_tr], X[n_tr:] = torch.as_tensor(xtr), torch.as_tensor(xva)
    y = torch.as_tensor(np.concatenate([ytr, yva]).astype(np.int64)).to(dev)
    mean = torch.zeros(d, dtype=torch.float64, device=dev)
    std = torch.ones(d, dtype=torch.float64, device=dev)
    if settings.standardize:
        mean, std = column_stats(X, n_tr)
        std[std <= 1e-12 * max(1.0, float(std.max()))] = 1.0   # constant features stay as they are
        rows = chunk_rows(d)
        for i in range(0, len(X), rows):
            X[i:i + rows] = (X[i:i + rows] - mean.float()) / std.float()
    return X, y, mean, std


def sweep(prob, val, settings):
    """The lambda path on prob, strongest first, each solve warm-started from the previous one,
    scored on val = (Z, y). Returns (a dict per lambda, (best lambda, its val score, its u));
    ties keep the larger lambda."""
    s, (Zva, yva) = settings, val
    r, K = prob.Z.shape[1], prob.num_classes
    state, path, best, last = new_state(prob), [], None, []
    for lam in sorted(s.lambdas, reverse=True):
        if len(last) == 2 and path[-1]["evaluations"] > 1:
            # the path is moving: start from the secant prediction in log lambda (measured on
            # 5,000 x 2048 x 100: 150 loss+gradient passes for 45 lambdas instead of 261)
            (l0, u0), (l1, u1) = last
            state.u = u1 + math.log(lam / l1) / math.log(l1 / l0) * (u1 - u0)
            state.loss = None
        info = solve(prob, lam, state, s.rtol, s.max_iter, s.history)
        last = (last + [(lam, state.u.clone())])[-2:]
        pred = predict(Zva, state.u[:r * K].view(r, K), state.u[r * K:])
        val = s.accuracy(pred, yva)[s.metric]
        path.append({"lambda": lam, "C": 1 / (lam * len(prob.Z)), "val": val, **info})
        if best is None or val > best[1]:           # ties keep the larger lambda
            best = (lam, val, state.u.clone())
        if s.log:
            s.log(f"  lambda {lam:9.3g}  val {s.metric} {val:.4f}  objective "
                  f"{info['objective']:.6g}  iterations {info['iterations']}"
                  f"{'' if info['converged'] else ' (not converged)'}")
    return path, best


def solve_from(prob, lam, start, settings):
    """Solve prob at lam from start = (W, b) in input coordinates: (info, W, b)."""
    state = new_state(prob, from_input_coords(prob, *start))
    info = solve(prob, lam, state, settings.rtol, settings.max_iter, settings.history)
    return ({"n": len(prob.Z), **info}, *to_input_coords(prob, state.u))


def fold_of(y, folds, seed=0):
    """Stratified fold number (0..folds-1) of each example: each class's examples in a seeded
    random order, dealt round-robin, continuing where the previous class stopped, so every fold
    holds each class within one example of an equal share and fold sizes differ by at most 1.

    >>> fold_of(np.array([0, 0, 0, 1, 1, 1]), 3).tolist()
    [1, 2, 0, 2, 1, 0]
    """
    rng = np.random.default_rng(seed)
    fold, dealt = np.empty(len(y), dtype=np.int64), 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (dealt + np.arange(len(idx))) % folds
        dealt += len(idx)
    return fold


def run_kfold(x, y, num_classes, settings, *, folds, seed=0, log=print):
    """k-fold cross-validation of the whole protocol over (x, y): fold i is the test set, fold
    i+1 (mod k) the validation set that picks lambda, the other k-2 folds the training set; the
    refit uses k-1 folds. Every example is predicted exactly once, and the metric is computed
    over all predictions pooled (for a small data set the one fixed test split's sampling error
    is the biggest error of all: about 2.5 points on 372 images). Returns (results, W, b) with
    W (k, D, K), b (k, K): fold i's probe on the raw features. log: the fold lines;
    settings.log: each fold's lambda lines."""
    fold = fold_of(y, folds, seed)
    pred = torch.empty(len(y), dtype=torch.int64)
    per_fold, probes = [], []
    for i in range(folds):
        test, val = fold == i, fold == (i + 1) % folds
        train = ~(test | val)
        if log:
            log(f"  fold {i + 1}/{folds}: {int(train.sum())} train, {int(val.sum())} val, "
                f"{int(test.sum())} test")
        r, W, b = run_probe((x[train], y[train]), (x[val], y[val]), (x[test], y[test]),
                            num_classes, settings)
        pred[torch.as_tensor(test)] = predict(torch.as_tensor(x[test]), W, b).cpu()
        keep = [k for k in r if k.startswith("test_")] + ["best_lambda", "best_val", "n_train",
                                                          "n_val", "n_test", "val_curve"]
        per_fold.append({k: r[k] for k in keep})
        probes.append((W, b))
    acc = [f["test_accuracy"] for f in per_fold]
    curve = {k: float(np.mean([f["val_curve"][k] for f in per_fold]))
             for k in per_fold[0]["val_curve"]}
    results = {**scored(settings.accuracy(pred, torch.as_tensor(y)), settings.metric),
               "folds": folds, "fold_seed": seed,
               # the spread of the per-fold scores: what one fold-sized test split would show
               "fold_accuracy_std": float(np.std(acc, ddof=1)), "fold_results": per_fold,
               "best_lambda": None, "val_curve": curve, "n_train": None, "n_val": None,
               "n_test": len(y), "dim": x.shape[1], "num_classes": num_classes,
               **{k: r[k] for k in ("standardize", "rtol", "device")}}
    Ws, bs = zip(*probes)
    return results, torch.stack(Ws), torch.stack(bs)


# ----------------------------------------------------------------------------------------------
# The solver. Parameters u = [B (r x K) flattened, c (K)] live in the rotated, centred coordinates
# z = (x - mean) @ V, so logits = z @ B + c; in input coordinates W = V @ B, b = c - mean @ W.
# L-BFGS runs on theta = u / scale.

@dataclasses.dataclass
class Problem:
    """Prepared features (prepare()): Z @ B gives the centred logits, mean (D,) the fitted rows'
    mean, V (D, r) the kept eigenvectors (None: centred only), e (r,) the variance along each
    direction; y the labels and num_classes, set by the caller."""
    Z: torch.Tensor
    mean: torch.Tensor
    V: torch.Tensor
    e: torch.Tensor
    y: torch.Tensor = None
    num_classes: int = None


@dataclasses.dataclass
class SolverState:
    """What solve() carries from one lambda to the next, updated in place: the parameters u; the
    loss, gradient and mean softmax curvature h at u (they do not depend on lambda; loss None:
    to be computed); the L-BFGS pairs S, Y and the scale and penalty they were made under."""
    u: torch.Tensor
    loss: float = None
    grad: torch.Tensor = None
    h: float = None
    S: list = dataclasses.field(default_factory=list)
    Y: list = dataclasses.field(default_factory=list)
    scale: torch.Tensor = None
    pen: torch.Tensor = None


def solve_logistic(X, y, lam, num_classes=None, *, device="cpu", rtol=1e-6, max_iter=5000,
                   history=20):
    """Logistic regression at one lambda, cold start, no standardization: (W, b, info) for
    logits = X @ W + b (float64). The objective is mean cross-entropy + lam/2 ||W||^2, i.e.
    scikit-learn's C = 1/(lam n).

        W, b, info = solve_logistic(x, y, lam=1e-3)    # x (N, D) float, y (N,) int
        pred = (x @ W.numpy() + b.numpy()).argmax(1)
    """
    X = torch.as_tensor(np.asarray(X, dtype=np.float32)).to(device).clone()
    y = torch.as_tensor(np.asarray(y, dtype=np.int64)).to(device)
    K = int(num_classes or int(y.max()) + 1)
    torch.set_flush_denormal(True)
    with cpu_threads(small_problem_threads(*X.shape, K, device)):
        prob = prepare(X, len(X), y, K)
        state = new_state(prob)
        info = solve(prob, float(lam), state, rtol, max_iter, history)
        W, b = to_input_coords(prob, state.u)
    return W, b, info


def chunk_rows(width):
    """Rows per chunk, so that a chunk `width` wide holds about 4M values."""
    return max(1024, (1 << 22) // max(1, width))


def column_stats(X, n):
    """float64 mean and standard deviation of the columns of rows [0, n) of X, in row chunks."""
    rows = chunk_rows(X.shape[1])
    mean = sum(X[i:min(i + rows, n)].double().sum(0) for i in range(0, n, rows)) / n
    var = sum((X[i:min(i + rows, n)].double() - mean).pow(2).sum(0) for i in range(0, n, rows))
    return mean, (var / n).sqrt()


@contextlib.contextmanager
def cpu_threads(n):
    """Run the block with n torch CPU threads (None: unchanged)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def small_problem_threads(n, d, num_classes, device):
    """1 for CPU problems too small to gain from threads: on a loaded machine every hand-off
    between threads can wait for a time slice (measured on 605 x 50 x 5: 0.3 ms per loss and
    gradient on one thread, 0.7-18 ms on two)."""
    return 1 if torch.device(device).type == "cpu" and n * d * num_classes < (1 << 24) else None


def eigh(cov):
    """torch.linalg.eigh; on the CPU in one thread: multi-threaded LAPACK eigh is fine on an idle
    machine but up to 100x slower when other processes hold the cores (measured: 512 x 512 in
    0.03 s on one thread, 2.6 s on two; 2048 x 2048 in 2 s on one, 8-18 s on two)."""
    with cpu_threads(1 if cov.device.type == "cpu" else None):
        return torch.linalg.eigh(cov)


def prepare(X, n_fit, y=None, num_classes=None):
    """Centre X (rows [0, n_fit) are fitted) and rotate it onto the eigenvectors of the fitted rows'
    covariance, in place when no direction is dropped. Directions without variance (rank-deficient
    features: dead units, fewer examples than dimensions) are dropped, which is exact since the
    optimal W lies in the span of the centred training rows. Returns a Problem (e: the
    eigenvalues) with y and num_classes as given."""
    n, d = X.shape
    rows = chunk_rows(d)
    mean, std = column_stats(X, n_fit)
    m32 = mean.float()
    if d > ROTATE_MAX_DIM:   # too wide for a D x D eigendecomposition: centre and scale only
        for i in range(0, n, rows):
            X[i:i + rows] -= m32
        return Problem(X, mean, None, std ** 2, y, num_classes)
    cov = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    for i in range(0, n_fit, rows):      # float64, so directions of no variance show as ~0
        xc = (X[i:min(i + rows, n_fit)] - m32).double()
        cov += xc.T @ xc
    e, V = eigh(cov / n_fit)
    keep = e > 1e-12 * e.max()           # drop the null space: W has no part in it at the optimum
    e, V = e[keep], V[:, keep].contiguous()
    V32 = V.float()
    Z = X if keep.all() else torch.empty(n, V.shape[1], dtype=X.dtype, device=X.device)
    for i in range(0, n, rows):
        Z[i:i + rows] = (X[i:i + rows] - m32) @ V32
    return Problem(Z, mean, V, e, y, num_classes)


def loss_grad(Z, y, u, num_classes):
    """Mean cross-entropy of logits Z @ B + c, its gradient with respect to u, and the mean softmax
    curvature h = mean p(1 - p) (sets the preconditioner). The softmax is float32; each example's
    loss log(1 + s') - (z_y - max) and its target-class gradient -(others)/(total) come from
    s' = sum of exp(z_k - max) over all k but the max, in float64, so examples fit to 1e-12 are
    not rounded to zero loss."""
    n, r = Z.shape
    K = num_classes
    B, c = u[:r * K].view(r, K), u[r * K:]
    B32, c32 = B.float(), c.float()
    loss = torch.zeros((), dtype=torch.float64, device=Z.device)
    gB = torch.zeros(r, K, dtype=torch.float64, device=Z.device)
    gc = torch.zeros(K, dtype=torch.float64, device=Z.device)
    sq = torch.zeros((), dtype=torch.float64, device=Z.device)
    rows = chunk_rows(K)
    for i in range(0, n, rows):
        z, t = Z[i:i + rows], y[i:i + rows]
        E = torch.addmm(c32, z, B32)                       # logits
        m, top = E.max(1, keepdim=True)
        zt = E.gather(1, t[:, None]).double() - m.double()  # z_y - max <= 0
        E.sub_(m).exp_()
        E.scatter_(1, top, 0.0)
        rest = E.sum(1, keepdim=True).double()              # s'
        E.scatter_(1, top, 1.0)
        total = 1 + rest
        loss += (torch.log1p(rest) - zt).sum()
        others = torch.where(top == t[:, None], rest, total - torch.exp(zt))
        E.mul_((1 / total).float())                         # softmax P
        sq += torch.linalg.vector_norm(E).double() ** 2
        E.scatter_(1, t[:, None], (-others / total).float())  # P - onehot, target column exact
        gB += (z.T @ E).double()
        gc += E.sum(0).double()
    return float(loss) / n, torch.cat([gB.flatten(), gc]) / n, float(n - sq) / (n * K)


def two_loop(g, S, Y):
    """-H g with the L-BFGS inverse-Hessian approximation from the pairs (s, y)."""
    q, alphas = g.clone(), []
    for s, y in zip(reversed(S), reversed(Y)):
        rho = 1 / y.dot(s)
        a = rho * s.dot(q)
        q -= a * y
        alphas.append((rho, a))
    if S:
        q *= S[-1].dot(Y[-1]) / Y[-1].dot(Y[-1])
    for (s, y), (rho, a) in zip(zip(S, Y), reversed(alphas)):
        q += (a - rho * y.dot(q)) * s
    return -q


def solve(prob, lam, state, rtol=1e-6, max_iter=1000, history=20):
    """Minimize the objective at `lam` by L-BFGS from state.u, in place (a SolverState: the L-BFGS
    pairs of the previous lambda are moved to this lambda and preconditioner exactly for the
    penalty term). Done when the L-BFGS estimates of what is left, the step d ~ u* - u and the
    decrease -g.d/2 ~ f - f*, are both small: the step would change the logits by less than
    sqrt(rtol) of their spread (squared sizes, as variances over the training examples, compare
    as rtol) and the objective by less than rtol relative; or when -g.d/2 is below float32 noise.
    Returns {objective, iterations, evaluations (of the loss and gradient), converged}."""
    Z, y, K, e = prob.Z, prob.y, prob.num_classes, prob.e
    r = Z.shape[1]
    n_w = r * K
    evals = 0
    if state.loss is None:
        state.loss, state.grad, state.h = loss_grad(Z, y, state.u, K)
        evals = 1
    h = max(state.h, 1e-12)
    scale = torch.cat([(1 / torch.sqrt(e * h + lam))[:, None].expand(r, K).flatten(),
                       torch.full((K,), 1 / math.sqrt(h), dtype=e.dtype, device=e.device)])
    pen = torch.zeros_like(scale)
    pen[:n_w] = lam
    S, Y = state.S, state.Y
    if S:   # pairs of the previous lambda: back to u coordinates, shift the penalty, rescale
        old_scale, old_pen = state.scale, state.pen
        for i in range(len(S)):
            s_u = S[i] * old_scale
            S[i] = s_u / scale
            Y[i] = (Y[i] / old_scale + (pen - old_pen) * s_u) * scale
    state.scale, state.pen = scale, pen

    def objective(u, loss, grad):
        return loss + 0.5 * float((pen * u * u).sum()), (grad + pen * u) * scale

    def logit_spread(v):      # sum over classes of the logits' variance over the examples
        c = v[n_w:]
        return float((e[:, None] * v[:n_w].view(r, K) ** 2).sum() + ((c - c.mean()) ** 2).sum())

    u = state.u
    f, g = objective(u, state.loss, state.grad)
    converged, it = False, 0
    while it < max_iter:
        d = two_loop(g, S, Y)
        gtd = float(g.dot(d))
        if gtd >= 0:          # not a descent direction: stale pairs (restart) or a zero gradient
            if not S:
                converged = True
                break
            S.clear(), Y.clear()
            continue
        if (logit_spread(d * scale) <= rtol * logit_spread(u) and -gtd / 2 <= rtol * abs(f)) \
                or -gtd / 2 <= 1e-9 * abs(f):
            converged = True
            break
        it += 1
        t = 1.0               # the preconditioned Hessian is about the identity
        while t > 1e-10:      # backtracking with safeguarded quadratic interpolation (Armijo)
            u_new = u + t * d * scale
            loss, grad, curv = loss_grad(Z, y, u_new, K)
            evals += 1
            f_new, g_new = objective(u_new, loss, grad)
            if f_new <= f + 1e-4 * t * gtd:
                break
            denom = f_new - f - gtd * t
            t_q = -gtd * t * t / (2 * denom) if math.isfinite(f_new) and denom > 0 else 0.1 * t
            t = min(0.5 * t, max(0.1 * t, t_q))
        else:                 # no decrease at float precision: as converged as it gets
            converged = logit_spread(d * scale) <= 1e3 * rtol * logit_spread(u)
            break
        s, yv = t * d, g_new - g
        if float(s.dot(yv)) > 1e-12 * float(s.dot(s)):
            S.append(s), Y.append(yv)
            if len(S) > history:
                S.pop(0), Y.pop(0)
        u, f, g = u_new, f_new, g_new
        state.u, state.loss, state.grad, state.h = u, loss, grad, curv
    return {"objective": f, "iterations": it, "evaluations": evals, "converged": converged}


def new_state(prob, u=None):
    """A SolverState at u (default: zeros) with nothing computed yet."""
    r, K = prob.Z.shape[1], prob.num_classes
    return SolverState(torch.zeros(r * K + K, dtype=torch.float64, device=prob.Z.device)
                       if u is None else u)


def to_input_coords(prob, u):
    """(W (D x K), b (K)) float64 for the inputs the problem was prepared from."""
    r, K = prob.Z.shape[1], prob.num_classes
    B, c = u[:r * K].view(r, K), u[r * K:]
    W = B if prob.V is None else prob.V @ B
    return W, c - prob.mean @ W


def from_input_coords(prob, W, b):
    """The inverse of to_input_coords: u for (W, b) (W's part outside V is dropped)."""
    B = W if prob.V is None else prob.V.T @ W
    return torch.cat([B.flatten(), b + prob.mean @ W])


def predict(X, W, b):
    """argmax of X @ W + b, in row chunks; X float32 (N, D) tensor or array."""
    X = torch.as_tensor(X)
    W32, b, rows = W.float().to(X.device), b.to(X.device), chunk_rows(W.shape[1])
    return torch.cat([((X[i:i + rows] @ W32).double() + b).argmax(1)
                      for i in range(0, len(X), rows)])


# ----------------------------------------------------------------------------------------------
# Inputs: lambdas, user features, checkpoint features with a cache

try:
    import common   # the kit's shared code, beside this file: the part below needs it
except ImportError:  # this file copied alone: the method above still works (it needs no common)
    common = None


def parse_lambdas(text):
    """'1e-6:1e5:45' (log-spaced, inclusive) or '0.1,1,10' -> sorted unique positive floats."""
    try:
        if ":" in text:
            lo, hi, num = text.split(":")
            lo, hi, num = float(lo), float(hi), int(num)
            if num < 1 or lo <= 0 or hi < lo:
                raise ValueError
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
            num = len(values)
    except ValueError:
        raise common.UserError(f"bad --lambdas {text!r}: write LOW:HIGH:COUNT (log-spaced, e.g. "
                               f"{DEFAULT_LAMBDAS}) or a list like 0.01,0.1,1")
    if num > MAX_LAMBDAS:   # before the values are made
        raise common.UserError(f"--lambdas {text!r} asks for {num:,} values; at most "
                               f"{MAX_LAMBDAS:,} (the default path has 45)")
    if ":" in text:
        values = np.logspace(math.log10(lo), math.log10(hi), num)
    values = sorted({float(v) for v in values})
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise common.UserError(f"bad --lambdas {text!r}: values must be finite and > 0")
    return values


def check_arrays(x, y, what, dim=None):
    """Validate one split's features and labels; return (float32 x, int64 y)."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise common.UserError(f"{what}: expected x of shape (N, D) and y of shape (N,), got "
                               f"{x.shape} and {y.shape}")
    if len(x) == 0:
        raise common.UserError(f"{what}: no examples")
    if dim is not None and x.shape[1] != dim:
        raise common.UserError(f"{what}: {x.shape[1]} features, but train has {dim}")
    if not np.issubdtype(x.dtype, np.number):
        raise common.UserError(f"{what}: features must be numeric, got {x.dtype}")
    # before anything sized by the class count: one label of 1e8 asked for 13.6 GB
    y = common.check_labels(y, what)
    x = np.asarray(x, dtype=np.float32)
    rows = np.flatnonzero(~np.isfinite(x).all(1))
    if len(rows):
        raise common.UserError(f"{what}: {len(rows)} rows hold NaN or inf (first: row "
                               f"{rows[0]}); fix or drop them")
    return x, y


def check_splits(train, val, test):
    (xtr, ytr) = train = check_arrays(*train, "train")
    val = check_arrays(*val, "val", xtr.shape[1])
    test = check_arrays(*test, "test", xtr.shape[1])
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise common.UserError(f"train holds a single class ({classes[0]}); a probe needs at "
                               f"least 2")
    for what, (_, yy) in (("val", val), ("test", test)):
        unseen = np.setdiff1d(np.unique(yy), classes)
        if len(unseen):
            raise common.UserError(f"{what} has classes absent from train ({unseen[:5].tolist()}"
                                   f"); give every class training examples")
    return train, val, test


def load_feature_file(path, seed):
    """--features FILE.npz -> (train, val, test) (x, y) pairs; val held out of train if absent."""
    if not os.path.exists(path):
        raise common.UserError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except Exception as e:
        raise common.UserError(f"cannot read {path} as .npz ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); expected arrays "
                               f"train_x, train_y, test_x, test_y[, val_x, val_y]")
    missing = [k for k in ("train_x", "train_y", "test_x", "test_y") if k not in arrays]
    if ("val_x" in arrays) != ("val_y" in arrays):
        missing.append("val_y" if "val_x" in arrays else "val_x")
    if missing:
        raise common.UserError(f"{path} lacks array(s) {', '.join(missing)}; expected train_x, "
                               f"train_y, test_x, test_y and optionally val_x, val_y")
    train = check_arrays(arrays["train_x"], arrays["train_y"], f"{path} train")
    if "val_x" in arrays:
        val = (arrays["val_x"], arrays["val_y"])
    else:
        keep, held = common.stratified_holdout(train[1], common.VAL_FRACTION, common.VAL_MAX,
                                               seed=seed)
        train, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    return check_splits(train, val, (arrays["test_x"], arrays["test_y"]))


def data_fingerprint(split):
    """sha256 of a split's labels and its images (in-memory) or file names, sizes and times."""
    h = hashlib.sha256(np.ascontiguousarray(split.labels).tobytes())
    src = split.source
    if src.images is not None:
        for i in range(0, len(split.indices), 4096):
            h.update(np.ascontiguousarray(src.images[split.indices[i:i + 4096]]).tobytes())
    elif src.paths is not None:
        for i in split.indices:
            p = src.paths[i]
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def safe_name(text):
    return "".join(c if c.isalnum() or c in "@,._-" else "_" for c in text)


@dataclasses.dataclass
class Checkpoint:
    """A loaded network on the device, ready to give features: its identity (common), the layer
    probed and the input resolution."""
    model: torch.nn.Module
    network: dict
    layer: str
    resolution: int


def load_checkpoint(name, args):
    model, network = common.load_pretrained(name)
    model.to(args.device)
    layer, = common.resolve_layers(model, [args.layer], f"{network['checkpoint']} "
                                                        f"({network['arch']})")
    return Checkpoint(model, network, layer, common.input_resolution(args.resolution, network))


def cached_features(ckpt, data, split, args):
    """Features of one split, from the cache (args.cache) when its key matches, else extracted
    (args.device, batch_size, workers) and cached."""
    view, network, layer, resolution = data[split], ckpt.network, ckpt.layer, ckpt.resolution
    key = {"version": CACHE_VERSION, "checkpoint_hash": network["checkpoint_hash"],
           "dataset": data["spec"], "split": split, "layer": layer, "resolution": int(resolution),
           "data": data_fingerprint(view), "n": len(view)}
    spec_hash = hashlib.sha256(data["spec"].encode()).hexdigest()[:8]
    path = os.path.join(args.cache, safe_name(network["checkpoint_hash"]),
                        f"{data['name']}-{spec_hash}", f"{layer}_{int(resolution)}px_{split}.npz")
    if os.path.exists(path):
        cached, why = read_cache(path, key, view)
        if cached:
            return cached
        print(f"  feature cache {path} is stale or corrupt ({why}); rebuilding it")
    t = time.time()
    loader = common.eval_loader(view, resolution, batch_size=args.batch_size, workers=args.workers)
    tick = common.Ticker(f"  extracting {split} {layer} features", len(view))
    feats, y = common.collect_features(ckpt.model, loader, [layer], args.device, progress=tick)
    x = feats[layer]
    if not np.isfinite(x).all():
        raise common.UserError(f"{network['checkpoint']}: the {layer} features of {data['spec']} "
                               f"{split} hold NaN or inf; the checkpoint's weights are broken")
    common.save_npz(path, x=x, y=y, key=np.array(json.dumps(key)))
    print(f"  extracted {split} {layer} features {x.shape} in {time.time() - t:.1f}s -> {path}")
    return x, y


def read_cache(path, key, view):
    """((x, y), None) from a cache file made with `key` for the split view, else (None, why)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stored, x, y = json.loads(str(f["key"])), f["x"], f["y"]
        if stored != key:
            why = "made for other data or settings"
        elif x.ndim != 2 or len(x) != len(view) or not np.array_equal(y, view.labels):
            why = "wrong shape or labels"
        elif not np.isfinite(x).all():
            why = "non-finite values"
        else:
            return (x.astype(np.float32, copy=False), y.astype(np.int64)), None
    except Exception as e:
        why = f"unreadable: {type(e).__name__}"
    return None, why


# ----------------------------------------------------------------------------------------------
# Outputs

def pair_dir(out, label, dataset, layer="pool", folds=None):
    """The folder of one (checkpoint, dataset) probe, where its results.json and probe.npz go:
    OUT/<checkpoint label>/<dataset>[+<layer> unless pool][+<k>fold].

    >>> pair_dir("probe", "softmax_s0", "cifar10", "block16", folds=5)
    'probe/softmax_s0/cifar10+block16+5fold'
    """
    name = dataset + ("" if layer == "pool" else f"+{layer}") + (f"+{folds}fold" if folds else "")
    return os.path.join(out, safe_name(label), name)


def summary_row(r):
    """One summary.csv row: the identity's fields and the objective's hyperparameters (a column
    each, common.hparam_columns: empty where the objective has none), then the probe's."""
    net = r.get("network") or {}
    row = {c: net.get(c) for c in ("run_id", "checkpoint", "checkpoint_path", "objective", "seed",
                                   "arch")}
    return {**row, **common.hparam_columns(net.get("hparams")),
            **{c: r.get(c) for c in SUMMARY_COLUMNS}}


def write_summary(out):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "results.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and r.get("kind") == "linear_probe":
            rows.append(summary_row(r))
    if rows:
        common.write_csv(os.path.join(out, "summary.csv"), rows)


def lambda_grid(results):
    """A results file's lambda grid in a few words, exact (a digest of all its values):
    '45 values, 1e-06 to 100000 (#3fa2c1)'."""
    grid = [str(k) for k in results.get("val_curve") or {}]
    try:
        grid.sort(key=float)
    except ValueError:  # not written by this script: compared as text
        grid.sort()
    digest = hashlib.sha256(",".join(grid).encode()).hexdigest()[:6]
    return f"{len(grid)} values, {grid[0]} to {grid[-1]} (#{digest})" if grid else "none"


def save_pair(out_dir, results, W, b, overwrite):
    """probe.npz (W, b, best_lambda; for --folds one of each per fold) and results.json. A pair's
    results.json may be replaced only by the same computation (the same checkpoint file or
    features file, data, layer, resolution and solver settings) or with --overwrite: two
    checkpoints with one label, or a rerun with other settings, replaced results without a word
    (common.refuse_replacing, the rule of every script)."""
    keys = ("features", "layer", "resolution", "metric", "standardize", "rtol", "folds",
            "fold_seed", ("lambdas", lambda_grid))
    common.refuse_replacing(os.path.join(out_dir, "results.json"), results, keys, overwrite,
                            "the probe")
    lam = (results["best_lambda"] if not results.get("folds") else
           [f["best_lambda"] for f in results["fold_results"]])
    common.save_npz(os.path.join(out_dir, "probe.npz"), W=W.cpu().numpy(), b=b.cpu().numpy(),
                    best_lambda=np.asarray(lam, dtype=np.float64))
    common.save_json(os.path.join(out_dir, "results.json"), results)


def outcome(results):
    """'test top1 83.1% at lambda 0.01', or for --folds the pooled score and the folds' spread."""
    text = f"test {results['metric']} {common.pct(results['test_accuracy'])}"
    if results.get("folds"):
        lams = [f["best_lambda"] for f in results["fold_results"]]
        return (f"{text} over {results['folds']} folds (per fold: sd "
                f"{common.pct(results['fold_accuracy_std'])}, lambda {min(lams):.3g} to "
                f"{max(lams):.3g})")
    return f"{text} at lambda {results['best_lambda']:.3g}"


def pooled(train, val, test, folds):
    """--folds: every split's examples in one (x, y), each class with at least `folds`."""
    x, y = (np.concatenate(parts) for parts in zip(train, val, test))
    counts = np.bincount(y)
    small = [c for c in np.unique(y) if counts[c] < folds]
    if small:
        raise common.UserError(f"class {small[0]} has {counts[small[0]]} examples, fewer than "
                               f"--folds {folds}; use fewer folds or drop the class")
    return x, y


def accuracy(pred, labels):
    """The probe's scorer: the project's one accuracy rule (common.class_counts, common.accuracy),
    {top1, mean_per_class}; the classes counted are those up to the largest label or prediction
    (mean_per_class averages over the classes that have test images)."""
    m = common.accuracy(common.class_counts(pred, labels, int(max(labels.max(), pred.max())) + 1))
    return {"top1": m["top1"], "mean_per_class": m["mean_per_class"]}


def probe(splits, num_classes, settings, args):
    """run_probe on the (train, val, test) splits, or with --folds run_kfold on their union."""
    if args.folds:
        x, y = pooled(*splits, args.folds)
        return run_kfold(x, y, num_classes, settings, folds=args.folds, seed=args.seed)
    return run_probe(*splits, num_classes, settings)


def pair_eta(started, done, total):
    """'pair 3 of 8 (eta 12m30s)': the pairs left, this one included, at the mean wall time of
    those done in this process (checkpoint loading and feature extraction included)."""
    if not done:
        return f"pair 1 of {total}"
    per_pair = (time.time() - started) / done
    return f"pair {done + 1} of {total} (eta {common.duration(per_pair * (total - done))})"


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", metavar="CKPT",
                     help="checkpoint paths (or run folders: their final.pt), "
                          "torchvision:ARCH[:WEIGHTS] names and/or the paper's networks, "
                          "paper:OBJECTIVE/seedK or paper:all (all 72, downloaded once); "
                          "this or --features is required")
    src.add_argument("--features", nargs="+", metavar="FILE.npz",
                     help="probe features you already have (arrays train_x, train_y, test_x, "
                          "test_y[, val_x, val_y]); this or --checkpoint is required")
    p.add_argument("--data", nargs="+", metavar="SPEC",
                   help="dataset specs (required with --checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", default="pool", help="block1..blockN, pool or logits")
    p.add_argument("--resolution", type=common.resolution, default=None,
                   help="input side length (default: the checkpoint's training resolution, "
                        "else 224)")
    p.add_argument("--lambdas", default=DEFAULT_LAMBDAS,
                   help=f"LOW:HIGH:COUNT log-spaced or a comma list (default {DEFAULT_LAMBDAS})")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="probe the raw features (default: standardize with train statistics)")
    p.add_argument("--metric", choices=["top1", "mean_per_class"], default="top1",
                   help="metric for --features (datasets say their own)")
    p.add_argument("--rtol", type=common.positive_float, default=1e-6,
                   help="stop a lambda when the estimated relative distance to the optimum "
                        "objective is below this (default 1e-6)")
    p.add_argument("--max-iter", type=common.positive_int, default=1000,
                   help="L-BFGS iterations per lambda")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--cache", default=None, help="feature cache folder (default OUT/cache)")
    p.add_argument("--batch-size", type=common.positive_int, default=256,
                   help="feature extraction batch size")
    p.add_argument("--workers", type=common.worker_count, default=None,
                   help="data loader workers (default: common.default_workers, the rule of "
                        "every script: on a GPU the cores this process may use less one, on "
                        "the CPU one)")
    p.add_argument("--folds", default=None, metavar="K", type=common.int_at_least(
                       3, "each fold is tested once, the next one picks lambda, the rest train"),
                   help="score by stratified K-fold cross-validation over all the images of "
                        "train, val and test pooled (fold i tests, fold i+1 picks lambda); for "
                        "small data sets, whose one test split has a large sampling error "
                        "(default: the train/val/test splits)")
    p.add_argument("--seed", type=common.seed, default=0,
                   help="seed of the --folds assignment and of the val hold-out for --features "
                        "files without val")
    p.add_argument("--download", action="store_true", help="download torchvision datasets")
    p.add_argument("--overwrite", action="store_true", help="replace results of another "
                   "checkpoint or setting in the same folder, or write into a folder that holds "
                   "results of another kind (default: refused)")
    p.add_argument("--verbose", action="store_true", help="also a line per lambda of the path "
                   "(val metric, objective, iterations; default: a line per pair)")
    args = p.parse_args(argv)
    if args.features:   # a flag of the other mode would be ignored: refused instead
        common.refuse_unused(p, args, FEATURES_USE, "with --features (it extracts no features: "
                             "it goes with --checkpoint)")
    else:
        common.refuse_unused(p, args, set(vars(args)) - {"metric"}, "with --checkpoint: each "
                             "dataset has its metric (top1, or mean_per_class for pets, "
                             "flowers, aircraft, caltech101); --metric goes with --features")
    return args


def probe_feature_files(args, settings):
    """--features: each file's splits probed, to OUT/<file name>/features[+Kfold]/."""
    if args.data:
        raise common.UserError("--data goes with --checkpoint; --features files hold their "
                               "own splits")
    stems = [os.path.splitext(os.path.basename(f))[0] for f in args.features]
    if len(set(stems)) != len(stems):
        raise common.UserError(f"two --features files share a name ({stems}); rename one")
    started = time.time()
    for i, (path, stem) in enumerate(zip(args.features, stems)):
        t0 = time.time()
        train, val, test = load_feature_file(path, args.seed)
        K = int(max(train[1].max(), val[1].max(), test[1].max())) + 1
        print(f"{pair_eta(started, i, len(stems))}: {stem}: {len(train[0])} train, "
              f"{len(val[0])} val, {len(test[0])} test, {train[0].shape[1]} dims, {K} "
              f"classes", flush=True)
        results, W, b = probe((train, val, test), K, settings, args)
        # no network: the features came from elsewhere; dataset_name is the file's stem
        results = {**common.result_header(None, None, "linear_probe"),
                   "dataset_name": stem, "features": path, "layer": None,
                   "resolution": None, **results, "seconds": time.time() - t0}
        out_dir = pair_dir(args.out, stem, "features", folds=args.folds)
        save_pair(out_dir, results, W, b, args.overwrite)
        print(f"{stem}: {outcome(results)} -> {out_dir}/results.json")
    write_summary(args.out)


def load_datasets(args):
    """--data's datasets, after a cheap check of --checkpoint's labels (output folders)."""
    labels = {}
    for name in args.checkpoint:
        label = None if name.startswith("torchvision:") else common.checkpoint_label(name)
        if label is not None and label in labels:
            raise common.UserError(f"checkpoints {labels[label]} and {name} share the label "
                                   f"{label!r} (their output folder); rename one")
        labels[label] = name
    datasets = [common.load_dataset(spec, download=args.download) for spec in args.data]
    names = [d["name"] for d in datasets]
    if len(set(names)) != len(names):
        raise common.UserError(f"two --data specs share the short name ({names}); "
                               f"give their folders different names")
    return datasets


def probe_checkpoints(args, settings):
    """--checkpoint: every (checkpoint, dataset) pair probed, to pair_dir(...)."""
    if not args.data:
        raise common.UserError("--checkpoint needs --data SPEC [SPEC ...]")
    args.cache = args.cache or os.path.join(args.out, "cache")
    common.make_shared_dir(args.cache, "--cache")
    args.checkpoint = common.checkpoint_names(args.checkpoint)  # cheap checks before long work
    datasets = load_datasets(args)
    if args.workers is None:   # a fixed 4 made PyTorch warn on 2 cores and fought the extraction
        args.workers = common.default_workers(args.device.type)[0]
    started, done, total = time.time(), 0, len(args.checkpoint) * len(datasets)
    for name in args.checkpoint:
        ckpt = load_checkpoint(name, args)
        for data in datasets:
            print(f"{pair_eta(started, done, total)}: {ckpt.network['checkpoint']} on "
                  f"{data['spec']}: {ckpt.layer} features at {ckpt.resolution}px", flush=True)
            probe_pair(ckpt, data, args, dataclasses.replace(settings, metric=data["metric"]))
            done += 1


def probe_pair(ckpt, data, args, settings):
    """One (checkpoint, dataset) pair: features, probe, results.json and probe.npz, summary."""
    t0 = time.time()
    splits = [cached_features(ckpt, data, s, args) for s in ("train", "val", "test")]
    results, W, b = probe(check_splits(*splits), data["num_classes"], settings, args)
    results = {**common.result_header(ckpt.network, data, "linear_probe"), "layer": ckpt.layer,
               "resolution": ckpt.resolution, **results, "seconds": time.time() - t0}
    out_dir = pair_dir(args.out, ckpt.network["checkpoint"], data["name"], ckpt.layer, args.folds)
    save_pair(out_dir, results, W, b, args.overwrite)
    write_summary(args.out)
    print(f"{ckpt.network['checkpoint']} on {data['name']}: {outcome(results)} "
          f"({results['seconds']:.1f}s) -> {out_dir}/results.json", flush=True)


def main(argv=None):
    args = parse_args(argv)
    args.device = common.resolve_device(args.device)
    settings = ProbeSettings(parse_lambdas(args.lambdas), args.metric, args.standardize,
                             args.device, args.rtol, args.max_iter, accuracy=accuracy,
                             log=print if args.verbose else None)   # 45 lines a pair by default
    common.make_out_dir(args.out, "linear_probe", args.overwrite)
    if args.features:
        probe_feature_files(args, settings)
    else:
        probe_checkpoints(args, settings)


if __name__ == "__main__":
    if common is None:
        print("error: the script needs common.py from the kit beside it; the method works "
              "alone: import it", file=sys.stderr)
        raise SystemExit(2)
    common.run_main(main)

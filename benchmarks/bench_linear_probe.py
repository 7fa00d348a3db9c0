"""Benchmark: linear_probe.py's regularization sweep vs scikit-learn's LogisticRegression (lbfgs).

Features: N train (+ N/5 val, N/5 test) x D, K balanced classes, generated to look like pooled
ResNet features: a power-law covariance spectrum (variance of the k-th direction ~ 1/k) rotated by
a random orthogonal matrix, class means in the 64 leading directions, then ReLU (about 60% zeros,
non-negative), so the probe's accuracy is meaningful (about 75% at N = 10,000, K = 100).
Both sides get the same standardization (train mean and standard deviation; float32 features, as
extraction gives them) and the same 45 lambdas (1e-6..1e5, scikit-learn's C = 1 / (lambda N)).

  ours     linear_probe.run_probe: the whole protocol (standardize, rotate, 45-lambda warm-started
           path scored on val, refit on train+val at the best lambda, test), default tolerance.
  sklearn  LogisticRegression(C, solver='lbfgs'), one cold fit per lambda (the usual loop), at
           its default tol=1e-4 and at tol=1e-6 (which reaches our objective values); max_iter
           10,000. Timed on every --every-th lambda of the 45 (--every 4: 12 lambdas) and
           extrapolated to 45 (measured sum x 45 / measured count), plus the refit at our best
           lambda on train+val (measured).
Accuracy check, on the measured lambdas: val accuracy and objective (float64, on the standardized
train features) of each side, and test accuracy of the refit at our chosen lambda. (At the
strongest lambdas scikit-learn stops after 1-2 iterations, its gradient being below tol, before
the bias has converged, so its val accuracy there differs from the optimum's; the objective
column shows which side is nearer the optimum.)

    .venv/bin/python benchmarks/bench_linear_probe.py                        # 10,000 x 2048, K=100
    .venv/bin/python benchmarks/bench_linear_probe.py --n 50000 --sklearn none
    .venv/bin/python benchmarks/bench_linear_probe.py --device cuda --n 10000 50000 200000 \\
        --sklearn none
The machine is shared and noisy: ours runs before and after scikit-learn and the faster of its
two runs is used (--repeats).
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import linear_probe  # noqa: E402


def make_features(n, dim, classes, seed=0, sep=0.5, informative=64, chunk=8192):
    """(x float32 (n, dim) >= 0, y int64 (n,)): post-ReLU-like features with class structure."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    sv = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    means = (rng.normal(size=(classes, dim)) * sep * sv).astype(np.float32)
    means[:, informative:] = 0
    Q = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32) * 5
    x = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, chunk):
        z = rng.standard_normal((min(chunk, n - i), dim), dtype=np.float32) * sv + means[y[i:i + chunk]]
        x[i:i + chunk] = np.maximum(z @ Q - 0.1, 0)
    return x, y


def objective(x, y, W, b, lam):
    """mean cross-entropy + lam/2 ||W||^2 in float64."""
    total = 0.0
    for i in range(0, len(x), 4096):
        z = x[i:i + 4096].astype(np.float64) @ W + b
        m = z.max(1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
        total += (lse - z[np.arange(len(z)), y[i:i + 4096]]).sum()
    return total / len(x) + lam / 2 * float((W * W).sum())


class Clock:
    """Wall and CPU (this process, all threads) seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def run_ours(data, K, lambdas, device, runs):
    with Clock() as clock:
        res, W, b = linear_probe.run_probe(*data, K, linear_probe.ProbeSettings(
            lambdas, device=device, log=None))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    runs.append(clock)
    return res


def sklearn_fit(x, y, lam, tol, model=None):
    from sklearn.linear_model import LogisticRegression
    C = 1 / (lam * len(x))
    model = model or LogisticRegression(C=C, tol=tol, max_iter=10000)
    model.set_params(C=C)
    with warnings.catch_warnings(), Clock() as clock:
        warnings.simplefilter("ignore")
        model.fit(x, y)
    return model, clock


def run_sklearn(data, lambdas, measured, tol, best_lam, warm):
    """Cold fits of the `measured` lambdas (extrapolated to all), or the whole path warm-started
    strongest first (warm=True, all measured); then the refit at our lambda on train+val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    (xtr, ytr), (xva, yva), (xte, yte) = data
    with Clock() as scale:
        scaler = StandardScaler().fit(xtr)
        xtr_s, xva_s, xte_s = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    name = f"sklearn {'warm path' if warm else 'cold'} tol={tol:g}"
    order = sorted(range(len(lambdas)), key=lambda i: -lambdas[i]) if warm else measured
    model = LogisticRegression(tol=tol, max_iter=10000, warm_start=True) if warm else None
    rows = []
    for i in order:
        lam = lambdas[i]
        m, clock = sklearn_fit(xtr_s, ytr, lam, tol, model)
        rows.append({"lambda": lam, "wall": clock.wall, "cpu": clock.cpu,
                     "iterations": int(m.n_iter_[0]), "val": float((m.predict(xva_s) == yva).mean()),
                     "objective": objective(xtr_s, ytr, m.coef_.T.astype(np.float64),
                                            m.intercept_.astype(np.float64), lam)})
        print(f"    {name}  lambda {lam:9.3g}  {clock.wall:7.1f}s  "
              f"{rows[-1]['iterations']:5d} iterations  val {rows[-1]['val']:.4f}", flush=True)
    m, refit = sklearn_fit(np.concatenate([xtr_s, xva_s]), np.concatenate([ytr, yva]), best_lam,
                           tol)
    factor = len(lambdas) / len(rows)
    total = {k: getattr(scale, k) + sum(r[k] for r in rows) * factor + getattr(refit, k)
             for k in ("wall", "cpu")}
    return {"name": name, "rows": rows, "refit": refit, "test": float((m.predict(xte_s) == yte).mean()),
            "total": total, "extrapolated": not warm}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10000], help="training set sizes")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--lambdas", default=linear_probe.DEFAULT_LAMBDAS)
    p.add_argument("--every", type=int, default=4, help="scikit-learn runs every k-th lambda")
    p.add_argument("--sklearn", default="cold:1e-4,cold:1e-6,warm:1e-6",
                   help="scikit-learn runs: comma list of cold:TOL (every --every-th lambda, "
                        "extrapolated) and warm:TOL (the whole path warm-started), or 'none'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="runs of ours (the fastest is used)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lambdas = linear_probe.parse_lambdas(args.lambdas)
    configs = []
    for item in ([] if args.sklearn == "none" else args.sklearn.split(",")):
        mode, _, tol = item.partition(":")
        if mode not in ("cold", "warm") or not tol:
            p.error(f"bad --sklearn item {item!r}: write cold:TOL or warm:TOL")
        configs.append((float(tol), mode == "warm"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for n in args.n:
        nv = n // 5
        t = time.perf_counter()
        x, y = make_features(n + 2 * nv, args.dim, args.classes)
        data = ((x[:n], y[:n]), (x[n:n + nv], y[n:n + nv]), (x[n + nv:], y[n + nv:]))
        print(f"\n{n} train + {nv} val + {nv} test x {args.dim}, {args.classes} classes, "
              f"{(x == 0).mean():.0%} zeros (made in {time.perf_counter() - t:.1f}s)", flush=True)
        runs = []
        res = run_ours(data, args.classes, lambdas, args.device, runs)
        s = res["solver_seconds"]
        passes = sum(q["evaluations"] for q in res["path"])
        print(f"  ours: {runs[-1].wall:.1f}s (prepare {s['prepare']:.1f}s, sweep {s['sweep']:.1f}s, "
              f"refit {s['refit']:.1f}s), {passes} loss+gradient passes for {len(lambdas)} lambdas "
              f"(+{res['refit']['evaluations']} for the refit), best lambda "
              f"{res['best_lambda']:.3g}, val {res['best_val']:.4f}, test {res['test_accuracy']:.4f}",
              flush=True)
        measured = list(range(0, len(lambdas), args.every))
        sk = []
        for tol, warm in configs:
            sk.append(run_sklearn(data, lambdas, measured, tol, res["best_lambda"], warm))
            if len(runs) < args.repeats:
                run_ours(data, args.classes, lambdas, args.device, runs)
                print(f"  ours again: {runs[-1].wall:.1f}s", flush=True)
        while len(runs) < args.repeats:
            run_ours(data, args.classes, lambdas, args.device, runs)
            print(f"  ours again: {runs[-1].wall:.1f}s", flush=True)
        wall, cpu = min(r.wall for r in runs), min(r.cpu for r in runs)
        print(f"\n  RESULT n={n} dim={args.dim} K={args.classes} device={args.device}: ours "
              f"{wall:.1f}s wall, {cpu:.1f}s CPU for the whole protocol (fastest of runs: "
              f"{', '.join(f'{r.wall:.1f}' for r in runs)}s wall), test {res['test_accuracy']:.4f}")
        path = {q["lambda"]: q for q in res["path"]}
        for r in sk:
            rows = [q for q in r["rows"] if q["lambda"] in [lambdas[i] for i in measured]]
            print(f"  {r['name']} against ours, per lambda:")
            print(f"    {'lambda':>9} {'seconds':>8} {'iters':>6} {'val':>7} {'ours':>7} "
                  f"{'objective - ours, relative':>27}")
            for q in rows:
                o = path[q["lambda"]]
                print(f"    {q['lambda']:9.3g} {q['wall']:8.1f} {q['iterations']:6d} "
                      f"{q['val']:7.4f} {o['val']:7.4f} "
                      f"{(q['objective'] - o['objective']) / o['objective']:27.1e}")
            near = [q for q in r["rows"] if 1 / 30 <= q["lambda"] / res["best_lambda"] <= 30]
            dval = max(abs(q["val"] - path[q["lambda"]]["val"]) for q in near) if near else 0.0
            worst = max((q["objective"] - path[q["lambda"]]["objective"]) / path[q["lambda"]]["objective"]
                        for q in r["rows"])
            best_sk = max(r["rows"], key=lambda q: (q["val"], q["lambda"]))
            how = (f"extrapolated from {len(r['rows'])}/{len(lambdas)} lambdas"
                   if r["extrapolated"] else f"all {len(lambdas)} lambdas")
            print(f"  RESULT {r['name']}: {r['total']['wall']:.1f}s wall, {r['total']['cpu']:.1f}s "
                  f"CPU, {how} (refit {r['refit'].wall:.1f}s); ours is "
                  f"{r['total']['wall'] / wall:.1f}x faster (wall), {r['total']['cpu'] / cpu:.1f}x "
                  f"(CPU); its objective is up to {worst:.1e} above ours (relative); val within "
                  f"{dval:.4f} of ours for lambda within 30x of our best; test at our lambda "
                  f"{r['test']:.4f} vs ours {res['test_accuracy']:.4f}; its own best lambda "
                  f"{best_sk['lambda']:.3g} (val {best_sk['val']:.4f})", flush=True)

if __name__ == "__main__":
    main()

"""make_figures.py on synthetic runs folders written in the formats of the other scripts' issues."""
import csv
import json
import math
import os
import sys

import numpy as np
import pytest

import common
import make_figures

OBJECTIVES = list(common.OBJECTIVES)
PROBE_SETS = ["digits@5-9", "flowers102"]       # the second one scored by mean per-class accuracy
FT_SETS = ["digits@5-9"]
LAYERS = [f"block{i}" for i in range(1, 9)] + ["pool", "logits"]


def fake_numbers(objective, seed, tau=None):
    """Values with the paper's trends: other objectives beat softmax on top-1 and R^2 and lose on
    linear transfer; fine-tuning equal. Seed noise is small but non-zero."""
    better = 0.0 if objective == "softmax" else 1.0 + 0.1 * OBJECTIVES.index(objective)
    if tau is not None:
        better += 5 * (0.04 - tau)
    noise = 0.002 * ((seed * 7 + OBJECTIVES.index(objective)) % 5 - 2)
    linear = 0.85 - 0.03 * better + noise
    if objective == "squared_error":   # one objective against the paper, to see "opposite"
        linear = 0.90 + noise
    return {"top1": 0.90 + 0.02 * better + noise, "r2": 0.30 + 0.10 * better + noise,
            "linear": linear, "finetune": 0.95 + noise}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def identity(label, objective, seed, hparams, **override):
    """A network's identity block as common.network_identity writes it."""
    return {"run_id": f"id-{label}", "checkpoint": label,
            "checkpoint_path": f"runs/train/{label}/final.pt", "checkpoint_hash": f"hash-{label}",
            "objective": objective, "hparams": hparams, "seed": seed, "arch": "resnet18",
            "dataset": "digits@0-4", "dataset_name": "digits@0-4", "resolution": 8,
            "small_input": True, **override}


SPECS = {"digits@5-9": "npz:/data/digits@5-9", "flowers102": "flowers102:/data"}


def make_runs(root, objectives=OBJECTIVES, seeds=(0, 1), sweep=(), cka=True, cs=True,
              probe=True, finetune=True):
    """A runs folder like the demo writes: train/<label>/, probe/<label>/<dataset>/,
    finetune/<label>/<dataset>/, cka/cka.{json,npz}, separation/class_separation.json, each
    file starting with common.result_header. `sweep`: extra logit_normalization tau values.
    Returns the list of networks written."""
    nets = [(o, s, None) for o in objectives for s in seeds]
    nets += [("logit_normalization", s, tau) for tau in sweep for s in seeds]
    written = []
    for obj, seed, tau in nets:
        hp = dict(common.OBJECTIVES[obj])
        label = f"{obj}_s{seed}"
        if tau is not None:
            hp["tau"] = tau
            label = f"{obj}_tau{tau}_s{seed}"
        num = fake_numbers(obj, seed, tau)
        net = identity(label, obj, seed, hp)
        write_json(os.path.join(root, "train", label, "results.json"), {
            **common.result_header(net, "digits@0-4", "train"), "epochs": 3,
            "top1": num["top1"], "top5": 0.99, "top1_raw": num["top1"] - 0.01, "top5_raw": 0.99,
            "train_seconds": 12.0, "images_per_second": 500.0, "val_top1": num["top1"]})
        for ds in PROBE_SETS if probe else []:
            metric = "mean_per_class" if ds == "flowers102" else "top1"
            write_json(os.path.join(root, "probe", label, ds, "results.json"), {
                **common.result_header(net, SPECS[ds], "linear_probe"), "layer": "pool",
                "metric": metric, "test_accuracy": num["linear"] - (0.1 if metric != "top1" else 0),
                "best_lambda": 1e-3, "val_curve": {"0.001": 0.8}, "n_train": 800, "n_val": 90,
                "n_test": 300, "dim": 512, "num_classes": 5, "seconds": 1.0})
        for ds in FT_SETS if finetune else []:
            write_json(os.path.join(root, "finetune", label, ds, "results.json"), {
                **common.result_header(net, SPECS[ds], "finetune"), "metric": "top1",
                "test_accuracy": num["finetune"], "best_lr": 0.01, "best_wd": 1e-4,
                "grid": {"lr=0.01,wd=0.0001": 0.94}, "seconds": 3.0})
            # a grid point of that fine-tune: finetune.py's own record, not a network
            write_json(os.path.join(root, "finetune", label, ds, "grid", "lr0.01", "results.json"),
                       {**common.result_header(identity(f"{label}_ft", "softmax", seed, {}),
                                               SPECS[ds], "finetune_run"), "top1": 0.5})
        written.append({"objective": obj, "seed": seed, "tau": tau, "label": label,
                        "identity": net, **num})
    main = [n for n in written if n["tau"] is None]
    if cs:   # class_separation.py: the networks, then one result per network in that order
        write_json(os.path.join(root, "separation", "class_separation.json"), {
            **common.result_header([n["identity"] for n in written], "digits@0-4",
                                   "class_separation"),
            "split": "train", "max_per_class": None,
            "results": [{"checkpoint": n["label"], "resolution": 8, "n_images": 900,
                         "num_classes": 5,
                         "layers": {"block8": {"r2": 0.1, "sparsity": 0.5, "dim": 30.0},
                                    "pool": {"r2": n["r2"], "sparsity": 0.4, "dim": 12.0}}}
                        for n in written]})
    if cka:  # cka_analysis.py: lower CKA between objectives in the last layers
        M, L = len(main), len(LAYERS)
        depth = np.linspace(0, 1, L)
        cka_arr = np.ones((M, M, L, L))
        for i, a in enumerate(main):
            for j, b in enumerate(main):
                if i != j:
                    k = OBJECTIVES.index(a["objective"]) + OBJECTIVES.index(b["objective"])
                    drop = 0.05 + (0.3 + 0.02 * k if a["objective"] != b["objective"] else 0.0) \
                        * depth ** 12 + 0.002 * ((a["seed"] + b["seed"] + i + j) % 3)  # seed noise
                    cka_arr[i, j, range(L), range(L)] = 1 - drop
        write_cka(root, [n["identity"] for n in main], cka_arr)
    return written


def write_cka(root, networks, cka_arr):
    write_json(os.path.join(root, "cka", "cka.json"), {
        **common.result_header(networks, "digits@0-4", "cka"), "split": "val",
        "layers": LAYERS, "n_images": 300})
    if cka_arr is not None:
        np.savez(_mk(root, "cka", "cka.npz"), cka=cka_arr, layers=np.array(LAYERS))


def _mk(root, folder, name):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    return os.path.join(root, folder, name)


def run_figures(monkeypatch, runs, out, *extra):
    monkeypatch.setattr(sys, "argv", ["make_figures.py", "--runs", str(runs), "--out", str(out),
                                      *extra])
    make_figures.main()
    with open(os.path.join(out, "report.md")) as f:
        return f.read()


def table_rows(report):
    """{objective display name: row cells} of the per-objective table."""
    section = report.split("## Per-objective results")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Objective",):
            rows[cells[0]] = cells
    header = next(l for l in section.splitlines() if l.startswith("| Objective"))
    return [c.strip() for c in header.strip().strip("|").split("|")], rows


def test_full_study(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    nets = make_runs(str(runs), sweep=(0.02, 0.08))
    report = run_figures(monkeypatch, runs, out)

    expected = ["fig1_top1_vs_transfer", "fig2_table", "fig3_cka_by_layer", "fig3_cka_matrices",
                "fig4_class_separation", "fig5_sweep_logit_normalization_tau"]
    for name in expected:
        for ext in ("png", "pdf"):
            path = out / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    assert len(list(out.glob("fig5_*.png"))) == 1   # only tau of logit_normalization is swept

    header, rows = table_rows(report)
    assert set(rows) == {make_figures.display(o) for o in OBJECTIVES}
    assert "Linear probe flowers102 mean per-class (%) [paper: worse (lower)]" in header
    assert "Source top-1 (%) [paper: better (higher)]" in header
    assert "Fine-tune digits@5-9 (%) [paper: no difference]" in header
    assert "Linear probe mean over datasets (%) [paper: worse (lower)]" in header

    # the main table holds the paper's tau only: two seeds per objective, not six
    for cells in rows.values():
        assert cells[1].startswith("2 (0, 1)")

    # numbers: mean +- standard error over seeds and Welch's p against softmax
    from scipy import stats
    col = header.index("Source top-1 (%) [paper: better (higher)]")
    top1 = {o: [100 * n["top1"] for n in nets if n["objective"] == o and n["tau"] is None]
            for o in OBJECTIVES}
    soft = rows["Softmax"][col]
    assert soft.startswith(f"{np.mean(top1['softmax']):.2f} ± "
                           f"{np.std(top1['softmax'], ddof=1) / np.sqrt(2):.2f}")
    p = stats.ttest_ind(top1["sigmoid"], top1["softmax"], equal_var=False).pvalue
    assert f"p={p:.2g}" in rows["Sigmoid"][col]
    assert "(agrees)" in rows["Sigmoid"][col]
    lin = header.index("Linear probe mean over datasets (%) [paper: worse (lower)]")
    assert "(agrees)" in rows["Sigmoid"][lin]
    assert "(opposite)" in rows["Squared error"][lin]
    assert "Class separation R^2 (pool) [paper: higher]" in header

    assert "Spearman" in report and "R^2 vs source top-1" in report
    corr = next(l for l in report.splitlines() if l.startswith("| R^2 vs source top-1"))
    means = [(np.mean([n["r2"] for n in nets if n["objective"] == o and n["tau"] is None]),
              np.mean(top1[o])) for o in OBJECTIVES]
    rho = stats.spearmanr(*zip(*means)).statistic
    assert rho > 0.5 and f"| {rho:.2f} (p=" in corr
    assert "## CKA (figure 3)" in report
    pool = next(l for l in report.splitlines() if l.startswith("| pool |"))
    logits = next(l for l in report.splitlines() if l.startswith("| logits |"))
    assert pool.endswith("| yes |") and logits.endswith("| yes |")
    assert next(l for l in report.splitlines() if l.startswith("| block1 |")).endswith("| no |")
    sweep = report.split("### Logit normalization: tau")[1]
    for tau in ("0.02", "0.04", "0.08"):
        assert f"\n| {tau} | 2 |" in sweep
    notes = [l for l in report.split("## Notes")[1].splitlines() if l.startswith("- ")]
    assert len(notes) == 1 and "3 hyperparameter setting(s)" in notes[0] and "tau=0.04" in notes[0]


def capture_figures(monkeypatch):
    """{name: figure} of every figure make_figures saves (closed, but its artists readable)."""
    figs, real = {}, make_figures.Figures.save

    def save(self, fig, name):
        figs[name] = fig
        return real(self, fig, name)
    monkeypatch.setattr(make_figures.Figures, "save", save)
    return figs


def test_figures_axes_legends_band_and_headers(tmp_path, monkeypatch):
    """Fine-tuning's axis spans at least the linear probe's (and 10 points), never a zoom onto
    seed noise; the legends say what the per-seed dots, the means, the fitted line and its band
    are; figure 6's band is the 95% band of the fitted mean; CKA cell text is readable; table
    headers never break a dataset name."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs))
    figs = capture_figures(monkeypatch)
    run_figures(monkeypatch, runs, out, "--formats", "png")
    span = lambda ax: ax.get_ylim()[1] - ax.get_ylim()[0]
    for name in ("fig1_top1_vs_transfer", "fig4_class_separation"):
        fig = figs[name]
        *_, linear, finetune = [ax for ax in fig.axes if ax.get_visible()]
        assert "linear" in linear.get_ylabel() and "fine-tune" in finetune.get_ylabel()
        assert span(finetune) >= max(span(linear), make_figures.MIN_ACCURACY_SPAN) - 1e-9
        assert 0 <= finetune.get_ylim()[0] and finetune.get_ylim()[1] <= 100
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels[-2:] == ["one network (a seed)", "mean ± s.e. over seeds"], labels
    labels = [t.get_text() for t in figs["fig6_r2_vs_linear"].legends[0].get_texts()]
    assert labels[-3:] == ["one network", "least-squares fit",
                           "95% confidence band\nof the fitted mean"]
    cells = [t for ax in figs["fig3_cka_matrices"].axes for t in ax.texts]
    assert cells and min(t.get_fontsize() for t in cells) >= 9

    # the band against its textbook formula: t s sqrt(1/n + (x - mean x)^2 / Sxx)
    from scipy import stats
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.6, 9)
    y = 60 - 20 * x + rng.normal(0, 1, 9)
    points = list(zip(x, y))
    grid = np.linspace(0, 1, 5)
    mean, low, high = make_figures.fit_band(points, make_figures.slope_fit(points), grid)
    ref = stats.linregress(x, y)
    s = math.sqrt(((y - ref.intercept - ref.slope * x) ** 2).sum() / 7)
    half = stats.t.ppf(0.975, 7) * s * np.sqrt(1 / 9 + (grid - x.mean()) ** 2 /
                                               ((x - x.mean()) ** 2).sum())
    np.testing.assert_allclose(mean, ref.intercept + ref.slope * grid, rtol=1e-9)
    np.testing.assert_allclose(high - mean, half, rtol=1e-9)
    np.testing.assert_allclose(mean - low, half, rtol=1e-9)

    h = make_figures.header_text
    assert h("Linear probe clothing_small (5-fold)", "%") == \
        "Linear probe\nclothing_small\n(5-fold)\xa0(%)"       # not at the hyphen, '(%)' kept
    assert h("Fine-tune cifar10@5-9,per_class=2000", "%") == \
        "Fine-tune cifar10\n@5-9,\nper_class=2000\xa0(%)"
    long = h("Linear probe a_dataset_name_longer_than_a_line", "")
    assert long.splitlines() == ["Linear probe", "a_dataset_name_longer_than_a_line"]
    ticks = [t.get_text() for t in figs["fig2_table"].axes[0].get_xticklabels()]
    assert "Linear probe\nflowers102 mean\nper-class\xa0(%)\npaper: worse (lower)" in ticks


def test_results_and_objectives_csv(tmp_path, monkeypatch):
    """results.csv: a row per network (the sweep's too), identity, hyperparameters, every metric
    on the report's scale; objectives.csv: the report's table, one row per objective and
    quantity, the same means, standard errors and p-values; dead units where measured."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    nets = make_runs(str(runs), sweep=(0.02,))
    sep = runs / "separation" / "class_separation.json"
    d = json.loads(sep.read_text())
    for r in d["results"]:                  # class_separation.py now also writes dead units
        r["layers"]["pool"]["dead"] = 0.25 if r["checkpoint"].startswith("softmax") else 0.5
    sep.write_text(json.dumps(d))
    report = run_figures(monkeypatch, runs, out, "--formats", "png")

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(nets) == 20
    assert list(rows[0])[:8] == ["run_id", "checkpoint", "objective", "seed", "arch", "dataset",
                                 "trained_here", "in_comparison"]
    assert list(rows[0])[8:17] == ["alpha", "lambda_", "dropout", "beta", "tau",
                                   "normalize_features", "kappa", "m", "loss_scale"]
    # in the report's objective order, a sweep's values beside its objective's table variant
    assert [r["objective"] for r in rows[::2]] == [
        o for o in OBJECTIVES for _ in range(2 if o == "logit_normalization" else 1)]
    assert [r["tau"] for r in rows if r["objective"] == "logit_normalization"] == \
        ["0.02", "0.02", "0.04", "0.04"]
    by_label = {r["checkpoint"]: r for r in rows}
    for n in nets:
        r = by_label[n["label"]]
        assert r["run_id"] == f"id-{n['label']}" and r["seed"] == str(n["seed"])
        assert float(r["top1"]) == pytest.approx(100 * n["top1"], abs=1e-4)
        assert float(r["linear:digits@5-9"]) == pytest.approx(100 * n["linear"], abs=1e-4)
        assert float(r["linear:flowers102"]) == pytest.approx(100 * n["linear"] - 10, abs=1e-4)
        assert float(r["finetune:digits@5-9"]) == pytest.approx(100 * n["finetune"], abs=1e-4)
        assert float(r["r2"]) == pytest.approx(n["r2"], abs=1e-6)
        assert (r["sparsity"], r["dim"], r["top1_from"], r["epochs"]) == ("0.4", "12", "training",
                                                                         "3")
        assert r["in_comparison"] == str(n["tau"] is None)
    assert by_label["softmax_s0"]["tau"] == "" and by_label["softmax_s0"]["dead"] == "0.25"
    assert by_label["logit_normalization_tau0.02_s1"]["tau"] == "0.02"
    assert by_label["cosine_softmax_s0"]["normalize_features"] == "True"
    assert by_label["label_smoothing_s1"]["alpha"] == "0.1"

    table = list(csv.DictReader(open(out / "objectives.csv")))
    cells = {(r["objective"], r["quantity"]): r for r in table}
    header, md = table_rows(report)
    quantities = ["top1", "r2", "linear:digits@5-9", "linear:flowers102", "linear:mean",
                  "finetune:digits@5-9", "sparsity", "dim", "dead"]
    assert len(table) == len(OBJECTIVES) * len(quantities)
    assert [r["quantity"] for r in table[:len(quantities)]] == quantities
    from scipy import stats
    top1 = {o: [100 * n["top1"] for n in nets if n["objective"] == o and n["tau"] is None]
            for o in ("softmax", "sigmoid")}
    c = cells[("sigmoid", "top1")]
    assert float(c["mean"]) == pytest.approx(np.mean(top1["sigmoid"]), rel=1e-5)
    assert float(c["se"]) == pytest.approx(np.std(top1["sigmoid"], ddof=1) / np.sqrt(2), rel=1e-5)
    p = stats.ttest_ind(top1["sigmoid"], top1["softmax"], equal_var=False).pvalue
    assert float(c["p"]) == pytest.approx(p, rel=1e-5) and c["n"] == "2"
    assert (c["unit"], c["paper_claim"], c["verdict"]) == ("%", "better (higher)", "agrees")
    col = header.index("Source top-1 (%) [paper: better (higher)]")
    assert md["Sigmoid"][col].startswith(f"{float(c['mean']):.2f} ± {float(c['se']):.2f}")
    assert cells[("squared_error", "linear:mean")]["verdict"] == "opposite"
    soft = cells[("softmax", "top1")]
    assert soft["p"] == soft["diff_vs_softmax"] == soft["verdict"] == ""
    assert cells[("logit_normalization", "top1")]["tau"] == "0.04"      # the table's variant
    dead = cells[("sigmoid", "dead")]
    assert (dead["mean"], dead["paper_claim"], dead["verdict"]) == ("0.5", "", "")
    assert float(cells[("sigmoid", "dead")]["p"]) < 0.05   # constant 0.25 vs 0.5: still a p


def test_one_objective_one_seed_no_cka(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "figs"
    make_runs(str(runs), objectives=["softmax"], seeds=(0,), cka=False, cs=False, finetune=False)
    report = run_figures(monkeypatch, runs, out)
    assert (out / "fig1_top1_vs_transfer.png").exists() and (out / "fig2_table.png").exists()
    assert (out / "fig2_table.pdf").exists()
    assert not list(out.glob("fig3_*")) and not list(out.glob("fig4_*"))
    assert not list(out.glob("fig5_*"))
    _, rows = table_rows(report)
    assert list(rows) == ["Softmax"]
    assert "(n=1)" in rows["Softmax"][2]
    rows = list(csv.DictReader(open(out / "results.csv")))    # no class separation: no dead
    assert len(rows) == 1 and rows[0]["r2"] == "" and "dead" not in rows[0]
    table = list(csv.DictReader(open(out / "objectives.csv")))
    assert [r["quantity"] for r in table] == ["top1", "linear:digits@5-9", "linear:flowers102",
                                              "linear:mean"]
    notes = report.split("## Notes")[1]
    assert "CKA (figure 3) skipped" in notes
    assert "Class separation (figure 4) skipped" in notes
    assert "sweeps (figure 5) skipped" in notes


def test_missing_fields_and_broken_files_become_notes(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    nets = make_runs(str(runs), objectives=["softmax", "sigmoid"], seeds=(0, 1), cka=False,
                     finetune=False)
    (runs / "train" / "broken").mkdir()
    (runs / "train" / "broken" / "results.json").write_text("{not json")
    write_cka(str(runs), [n["identity"] for n in nets], None)
    (runs / "cka" / "cka.npz").write_bytes(b"truncated")
    # a probe of the same network through a copy of its checkpoint elsewhere: joined by run id
    res = runs / "probe" / "sigmoid_s1" / "digits@5-9" / "results.json"
    data = json.loads(res.read_text())
    data["network"].update(checkpoint="copy", checkpoint_path="/elsewhere/copy.pt")
    res.write_text(json.dumps(data))
    # a training result without a finite top1
    tr = runs / "train" / "softmax_s1" / "results.json"
    data = json.loads(tr.read_text())
    data["top1"] = float("nan")
    tr.write_text(json.dumps(data))
    # a rerun of one probe written elsewhere, later: the newer result wins, with a note
    src = runs / "probe" / "softmax_s0" / "digits@5-9" / "results.json"
    rerun = json.loads(src.read_text())
    rerun["test_accuracy"] = 0.5
    write_json(str(runs / "probe_rerun" / "results.json"), rerun)
    os.utime(src, (1e9, 1e9))
    # results that cannot be joined: each gets one note, none is counted
    old = {"checkpoint": "runs/train/softmax_s0/final.pt", "objective": "softmax", "seed": 0,
           "dataset": "digits@5-9", "best_lambda": 1e-3, "test_accuracy": 0.01}
    write_json(str(runs / "old" / "results.json"), old)                      # before issue 12
    no_id = {**rerun, "network": {**rerun["network"], "run_id": None}, "test_accuracy": 0.01}
    write_json(str(runs / "no_id" / "results.json"), no_id)                  # an older checkpoint
    snap = {**rerun, "network": {**rerun["network"], "checkpoint_hash": "other"},
            "test_accuracy": 0.01}
    write_json(str(runs / "snapshot" / "results.json"), snap)               # not the final.pt
    report = run_figures(monkeypatch, runs, out)
    notes = report.split("## Notes")[1]
    assert "`probe/softmax_s0/digits@5-9/results.json` and `probe_rerun/results.json`" in notes
    assert "`train/broken/results.json`: cannot be read as JSON" in notes
    assert "`cka/cka.npz`: cannot be read" in notes
    assert "top1 is missing or not a finite number" in notes
    assert notes.count("`old/results.json`: no identity block") == 1
    assert notes.count("`no_id/results.json`: checkpoint softmax_s0 has no run id") == 1
    assert notes.count("`snapshot/results.json`: checkpoint softmax_s0 of run id-softmax_s0 is "
                       "not that run's final.pt") == 1
    assert "grid" not in notes                             # fine-tune grid points are not notes
    header, rows = table_rows(report)
    assert rows["Softmax"][1].startswith("2 (0, 1)")
    top1 = rows["Softmax"][header.index("Source top-1 (%) [paper: better (higher)]")]
    assert "(n=1)" in top1
    probe = rows["Sigmoid"][header.index("Linear probe digits@5-9 (%) [paper: worse (lower)]")]
    assert "±" in probe                                   # both seeds, one through the copy
    soft = rows["Softmax"][header.index("Linear probe digits@5-9 (%) [paper: worse (lower)]")]
    s1 = 100 * fake_numbers("softmax", 1)["linear"]
    assert soft.startswith(f"{(50 + s1) / 2:.2f} ± {abs(s1 - 50) / 2:.2f}")
    assert (out / "fig4_class_separation.png").exists()


def test_failed_runs_are_named_in_the_notes(tmp_path, monkeypatch):
    """demo.sh's FAILED files: a failed training is a missing network, a failed fine-tune a
    missing result; a FAILED beside a results.json is stale (the run finished since)."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs), objectives=["softmax", "sigmoid"], seeds=(0,), cka=False)
    why = "exit 2: error: the loss became nan/inf at step 4 (epoch 1) (log: logs/x.log)"
    for folder in ("train/squared_error_s0", "finetune/sigmoid_s0/flowers102",
                   "train/softmax_s0"):                                 # the last one: stale
        os.makedirs(runs / folder, exist_ok=True)
        (runs / folder / "FAILED").write_text(why + "\n")
    notes = run_figures(monkeypatch, runs, out, "--formats", "png").split("## Notes")[1]
    assert f"- `train/squared_error_s0` failed, so this network is missing from every result: " \
           f"{why}\n" in notes
    assert f"- `finetune/sigmoid_s0/flowers102` failed, so its results are missing: {why}\n" \
           in notes
    assert "softmax_s0`" not in notes


def test_torchvision_and_scratch_results(tmp_path, monkeypatch):
    """Published weights (no run id) get a note; --from-scratch fine-tunes are listed apart."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs), objectives=["softmax"], seeds=(0,), cka=False, cs=False)
    tv = common.torchvision_identity("torchvision:resnet18:IMAGENET1K_V1", "resnet18",
                                     "IMAGENET1K_V1")
    write_json(str(runs / "probe" / "tv" / "results.json"), {
        **common.result_header(tv, "digits@5-9", "linear_probe"), "layer": "pool",
        "metric": "top1", "test_accuracy": 0.9, "best_lambda": 1.0})
    write_json(str(runs / "finetune" / "scratch" / "results.json"), {
        **common.result_header(common.scratch_identity("resnet18", True), "digits@5-9",
                               "finetune"), "metric": "top1", "test_accuracy": 0.42,
        "best_lr": 0.1, "best_wd": 1e-4})
    report = run_figures(monkeypatch, runs, out, "--formats", "png")
    assert "published weights torchvision:resnet18:IMAGENET1K_V1 are not part of the objective " \
           "comparison" in report
    assert "- Fine-tune digits@5-9: 0.42 (n=1)" in report
    _, rows = table_rows(report)
    assert list(rows) == ["Softmax"]


def test_bad_input_is_one_line_error(tmp_path, monkeypatch, capsys):
    for runs in (tmp_path / "absent", tmp_path):
        monkeypatch.setattr(sys, "argv", ["make_figures.py", "--runs", str(runs)])
        with pytest.raises(SystemExit) as e:
            common.run_main(make_figures.main)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_sweep_results_join_on_run_id(tmp_path, monkeypatch):
    """Two sweep values whose run folders share a name; the probe ran elsewhere (checkpoint
    paths that no longer resolve) and its results still land on the right run."""
    runs = tmp_path / "runs"
    for tau, acc in ((0.02, 0.70), (0.04, 0.80)):
        for seed in (0, 1):
            label = f"logit_normalization_s{seed}"
            net = identity(label, "logit_normalization", seed, {"tau": tau},
                           run_id=f"tau{tau}-s{seed}",
                           checkpoint_path=f"old/place/tau{tau}/{label}/final.pt")
            write_json(str(runs / f"tau{tau}" / label / "results.json"), {
                **common.result_header(net, "digits@0-4", "train"), "epochs": 1, "top1": 0.9,
                "top5": 1.0})
            write_json(str(runs / "probe" / f"{tau}_{seed}" / "results.json"), {
                **common.result_header(net, "digits@5-9", "linear_probe"), "layer": "pool",
                "metric": "top1", "test_accuracy": acc + 0.01 * seed, "best_lambda": 0.1})
    report = run_figures(monkeypatch, runs, tmp_path / "out")
    sweep = report.split("### Logit normalization: tau")[1]
    assert "| 0.02 | 2 | 90.00 ± 0.00 | 70.50 ± 0.50 |" in sweep
    assert "| 0.04 | 2 | 90.00 ± 0.00 | 80.50 ± 0.50 |" in sweep
    assert "without a training results.json" not in report
    assert (tmp_path / "out" / "fig5_sweep_logit_normalization_tau.png").exists()


def verdict_rows(report):
    section = report.split("## Verdicts on the paper's claims")[1].split("\n## ")[0]
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in section.splitlines()
            if l.startswith("| ") and not l.startswith("| Claim")]
    return {r[0]: r[1].strip("*") for r in rows}


def test_verdicts_follow_the_stated_rules(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs))
    report = run_figures(monkeypatch, runs, out, "--formats", "png")
    v = verdict_rows(report)
    assert len(v) == 7
    assert v["Non-softmax objectives have higher source top-1 than softmax"] == "holds"
    assert v["Non-softmax objectives have higher class separation R^2 than softmax"] == "holds"
    # squared_error goes significantly the other way in the fake data: no verdict either way
    title = next(k for k in v if k.startswith("Non-softmax objectives have lower linear-probe"))
    assert v[title] == "cannot tell"
    assert v["Higher R^2 goes with lower linear-probe transfer"] == "cannot tell"  # rho = -0.4
    # 2 seeds each, fine-tune values 0.2-0.4 points apart: not shown equivalent within 1 point
    # (non-significance alone is no evidence of no difference)
    assert v["Fine-tuning differences are small"] == "cannot tell"
    assert "against 9.80 points linear-probed on the same data" in report  # digits@5-9 matched
    cka = next(k for k in v if k.startswith("CKA between objectives"))
    assert v[cka] == "holds"


def test_slope_rule(tmp_path, monkeypatch):
    """Rule 1 against scipy's linregress and at each boundary; rule 2 over targets; a k-fold
    probe is a target of its own; rule 3 puts softmax into the label-smoothing sweep at 0."""
    from scipy import stats
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.5, 12)
    y = 70 - 15 * x + rng.normal(0, 0.5, 12)
    f = make_figures.slope_fit(list(zip(x, y)))
    ref = stats.linregress(x, y)
    t = stats.t.ppf(0.975, 10)
    assert f["slope"] == pytest.approx(ref.slope / 10)
    assert (f["low"], f["high"]) == pytest.approx(((ref.slope - t * ref.stderr) / 10,
                                                   (ref.slope + t * ref.stderr) / 10))
    assert f["p"] == pytest.approx(ref.pvalue)
    v = make_figures.slope_verdict
    fit = lambda s, lo, hi: {"slope": s, "low": lo, "high": hi}
    assert v(fit(-0.6, -1.0, -0.1)) == "holds"
    assert v(fit(-0.4, -1.0, -0.1)) == "cannot tell"       # below 0, but the estimate is < delta
    assert v(fit(-0.6, -1.2, 0.1)) == "cannot tell"        # the interval reaches 0
    assert v(fit(0.0, -0.4, 0.4)) == "refuted"             # a meaningful negative effect excluded
    assert v(fit(1.0, 0.6, 1.4)) == "refuted, opposite"
    assert v(fit(0.3, -0.6, 1.2)) == "cannot tell" and v(None) == "cannot tell"
    o = make_figures.overall_verdict
    assert o(["holds", "holds", "cannot tell"]) == "holds"
    assert o(["holds", "holds", "refuted"]) == "depends on the target"
    assert o(["refuted", "refuted, opposite", "cannot tell"]) == "refuted"
    assert o(["holds", "cannot tell", "cannot tell"]) == "depends on the target"
    assert o(["cannot tell"]) == "cannot tell" and o(["holds"]) == "holds"   # a single target
    assert o(["cannot tell", "cannot tell"]) == "cannot tell"                # none decides

    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs), objectives=["softmax", "label_smoothing"], cka=False, finetune=False)
    for alpha in (0.2, 0.4):     # a label-smoothing sweep; R^2 rises, transfer falls with alpha
        for seed in (0, 1):
            label = f"label_smoothing_a{alpha}_s{seed}"
            net = identity(label, "label_smoothing", seed, {"alpha": alpha})
            write_json(os.path.join(runs, "train", label, "results.json"), {
                **common.result_header(net, "digits@0-4", "train"), "top1": 0.9})
            write_json(os.path.join(runs, "probe", label, "digits@5-9", "results.json"), {
                **common.result_header(net, SPECS["digits@5-9"], "linear_probe"),
                "layer": "pool", "metric": "top1", "test_accuracy": 0.8 - alpha / 5 + seed / 1e3})
            write_json(os.path.join(runs, "probe", label, "digits@5-9+block6", "results.json"), {
                **common.result_header(net, SPECS["digits@5-9"], "linear_probe"),
                "layer": "block6", "metric": "top1", "test_accuracy": 0.7})
            write_json(os.path.join(runs, "probe", label, "digits@5-9+5fold", "results.json"), {
                **common.result_header(net, SPECS["digits@5-9"], "linear_probe"), "folds": 5,
                "layer": "pool", "metric": "top1", "test_accuracy": 0.5})
            sep = json.loads((runs / "separation" / "class_separation.json").read_text())
            sep["networks"].append(net)
            sep["results"].append({"layers": {"pool": {"r2": 0.3 + alpha + seed / 1e3}}})
            write_json(os.path.join(runs, "separation", "class_separation.json"), sep)
    report = run_figures(monkeypatch, runs, out, "--formats", "png")
    assert (out / "fig6_r2_vs_linear.png").exists()
    section = report.split("## R^2 against linear transfer")[1].split("\n## ")[0]
    rows = {l.split("|")[1].strip(): l for l in section.splitlines() if l.startswith("| digits")}
    assert set(rows) == {"digits@5-9", "digits@5-9 (5-fold)"}
    assert rows["digits@5-9"].rstrip().endswith("| holds |")
    sweep = next(l for l in section.splitlines()
                 if l.startswith("| Label smoothing alpha (0, 0.1, 0.2, 0.4) | digits@5-9 |"))
    assert "holds" in sweep and ", rises" in sweep
    layers = report.split("### digits@5-9: block6")[1].split("\n## ")[0]
    assert "| Label smoothing | - | 81.70 ± 0.20 |" in layers  # the main variant (0.1) has none
    assert "block6 +0.00 [" in layers                          # flat: 70% at every R^2
    assert "`digits@5-9 (5-fold)` (4 networks): ? images, each predicted once by 5-fold" in report


def cell(diff, p, claim):
    return {"diff": diff, "p": p, "verdict": make_figures.verdict(claim, diff, p)}


def test_direction_verdict_rules():
    f = make_figures.direction_verdict
    base = {"softmax": {"top1": cell(math.nan, math.nan, "higher")}}
    agree = {f"o{i}": {"top1": cell(1.0, 0.01, "higher")} for i in range(4)}
    ns = {f"n{i}": {"top1": cell(-0.5, 0.5, "higher")} for i in range(4)}
    against = {f"a{i}": {"top1": cell(-1.0, 0.01, "higher")} for i in range(4)}
    assert f({**base, **agree, **ns}, "top1", "higher")[0] == "holds"        # 4 of 8 agree
    assert f({**base, **against, **ns}, "top1", "higher")[0] == "does not hold"
    assert f({**base, **agree, **against}, "top1", "higher")[0] == "cannot tell"
    assert f({**base, **ns}, "top1", "higher")[0] == "cannot tell"
    assert "for 0 of 4 objectives" in f({**base, **ns}, "top1", "higher")[1]
    assert f({"o1": {"top1": cell(1.0, 0.01, "higher")}}, "top1", "higher") is None  # no softmax


def test_seeds_needed():
    c = {"softmax": {"top1": {"diff": math.nan, "se": 0.5, "n": 2, "p": math.nan, "verdict": ""}},
         "sigmoid": {"top1": {"diff": 1.0, "se": 0.5, "n": 2, "p": 0.3, "verdict": "n.s."}}}
    # variance 0.5 + 0.5 per seed: 1 / sqrt(1 / n) >= t(0.975, 2n - 2) first at n = 6
    assert make_figures.seeds_needed(c, "top1", "higher") == 6
    assert make_figures.seeds_needed(c, "top1", "lower") is None   # points the other way


def test_cka_verdict_per_objective():
    L = len(LAYERS)
    late = np.array([l in ("block7", "block8", "pool", "logits") for l in LAYERS])
    idx = {"softmax": [0, 1], "sigmoid": [2, 3], "squared_error": [4, 5]}
    diag = np.full((6, 6, L), np.nan)
    for n, (i, j) in enumerate([(0, 1), (2, 3), (4, 5)]):   # different seeds: 0.94-0.96
        diag[i, j] = diag[j, i] = 0.94 + 0.01 * n
    for k, (i, j) in enumerate([(i, j) for i in (0, 1) for j in (2, 3)]):
        diag[i, j] = diag[j, i] = np.where(late, 0.70, 0.95) + 0.002 * k  # below late only
    for k, (i, j) in enumerate([(i, j) for i in (0, 1) for j in (4, 5)]):
        diag[i, j] = diag[j, i] = 0.70 + 0.002 * k                        # below everywhere
    same = np.array([diag[0, 1], diag[2, 3], diag[4, 5]])
    s = {"diag": diag, "same": same, "ref": "softmax"}
    c = {"layers": LAYERS}
    v, text = make_figures.cka_verdict(c, s, idx)
    assert v == "does not hold" and "in an earlier layer: Squared error (block1" in text
    assert "only in the last few layers (block7, block8, pool, logits): Sigmoid (block7" in text
    only = {"softmax": [0, 1], "sigmoid": [2, 3]}
    assert make_figures.cka_verdict(c, s, only)[0] == "holds"
    flat = diag.copy()
    flat[:2, 2:4] = flat[2:4, :2] = 0.95   # sigmoid matches softmax at every layer
    v, text = make_figures.cka_verdict(c, {**s, "diag": flat}, only)
    assert v == "cannot tell" and text.endswith("at no layer: Sigmoid")


def test_imported_networks_take_source_top1_from_evaluate(tmp_path, monkeypatch):
    """Imported networks (a run id, no training results.json) join their probe, CKA and class
    separation results by run id, and take their source top-1 from train_imagenet.py
    --evaluate on their own training data: the TF preprocessing's for tf_same networks."""
    runs = tmp_path / "runs"
    written = make_runs(runs, objectives=["softmax", "sigmoid"], finetune=False)
    for n in written:
        os.remove(runs / "train" / n["label"] / "results.json")
        net = {**n["identity"], "stem_pool": "tf_same"}
        for pre, top1 in (("tf", n["top1"]), ("torchvision", n["top1"] - 0.05)):
            write_json(str(runs / "eval" / pre / n["label"] / "results.json"), {
                **common.result_header(net, "digits@0-4", "evaluate"), "top1": top1,
                "top5": 1.0, "mean_per_class": top1, "metric": "top1", "count": 300,
                "resolution": 8, "preprocessing": pre})
        write_json(str(runs / "eval" / "other" / n["label"] / "results.json"), {
            **common.result_header(net, "digits@5-9", "evaluate"), "top1": 0.1})
    notes = []
    _, nets, _ = make_figures.load_networks(str(runs), notes)
    assert {n["label"]: n["top1"] for n in nets} == \
        {n["label"]: pytest.approx(100 * n["top1"]) for n in written}
    assert sum("not on the network's training data" in x for x in notes) == len(written)
    assert any(f"{len(written)} network(s) without a training results.json" in x and
               f"source top-1 of {len(written)} from" in x for x in notes), notes
    report = run_figures(monkeypatch, runs, tmp_path / "out")
    assert (tmp_path / "out" / "fig1_top1_vs_transfer.png").exists()
    assert "no run id" not in report and f"{3 * len(written)} evaluate results.json" in report
    assert (f"- Evaluated without training here (train_imagenet.py --evaluate): "
            f"{3 * len(written)} result(s) on `digits@5-9 / digits@0-4` (test split, 300 "
            f"images), resnet18 at 8 px, tf / torchvision preprocessing.") in report


def test_a_full_disk_leaves_no_empty_figure(tmp_path, monkeypatch):
    import errno
    runs, out = tmp_path / "runs", tmp_path / "figs"
    make_runs(str(runs), objectives=["softmax"], seeds=(0,), cka=False, cs=False, finetune=False)
    run_figures(monkeypatch, runs, out)
    before = (out / "fig2_table.png").read_bytes()
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while fig2_table.png is rewritten
        if ".fig2_table.png." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(common.UserError, match="fig2_table.png: no space left"):
        run_figures(monkeypatch, runs, out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (out / "fig2_table.png").read_bytes() == before  # the old figure, whole
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_welch_tost_and_holm_match_their_definitions():
    from scipy import stats
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.normal(0.5, 1, size=3), rng.normal(0, 0.3, size=4)
        w = make_figures.welch(a, b)
        assert w["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert (w["low"], w["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        # TOST at ALPHA <=> the 90% interval inside the margin
        w90 = make_figures.welch(a, b, level=0.90)
        inside = -1 < w90["low"] and w90["high"] < 1
        assert (make_figures.tost_p(a, b, 1.0) < 0.05) == inside
    assert make_figures.tost_p([70.0, 70.1, 70.05], [70.2, 70.15, 70.25], 1.0) < 0.01
    assert make_figures.tost_p([70.0], [70.2, 70.1], 1.0) != make_figures.tost_p([70.0], [70.2, 70.1], 1.0)  # NaN: one value
    assert make_figures.holm([0.01, 0.04, 0.03, float("nan")])[:3] == [0.03, 0.06, 0.06]


def test_each_file_is_checked_whole_before_any_of_it_is_used(tmp_path, monkeypatch):
    """Nested fields of the wrong type, deep nesting and accuracies outside [0, 1] are one note
    each, and a damaged copy of a run that sorts before the good one no longer hides it: its run
    id was registered before the file was checked, and the report had 0 figures (issue 25)."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_runs(str(runs), objectives=["softmax", "sigmoid"], seeds=(0, 1), cka=False,
              finetune=False)
    good = json.loads((runs / "train" / "softmax_s0" / "results.json").read_text())
    bad = {
        "train/a_copy_of_softmax_s0/results.json": {**good, "top1": "0.9"},  # sorts first
        "train/b_string_network/results.json": {**good, "network": "softmax_s0"},
        "train/c_above_one/results.json": {**good, "top1": 5.0},
        "train/d_list_hparams/results.json": {
            **good, "network": {**good["network"], "run_id": "d", "hparams": {"tau": [1]}}},
        "probe/e/results.json": {**json.loads((runs / "probe" / "softmax_s0" / "digits@5-9" /
                                                "results.json").read_text()),
                                 "test_accuracy": -0.1},
        "separation2/class_separation.json": {**json.loads(
            (runs / "separation" / "class_separation.json").read_text()), "results": "r"},
        "separation3/class_separation.json": {**json.loads(
            (runs / "separation" / "class_separation.json").read_text()),
            "results": [{"layers": {"pool": {"r2": "high"}}}] * 4},
    }
    for rel, content in bad.items():
        write_json(str(runs / rel), content)
    (runs / "deep").mkdir()
    (runs / "deep" / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    report = run_figures(monkeypatch, runs, out)
    notes = report.split("## Notes")[1]
    for rel, why in (
            ("train/a_copy_of_softmax_s0", "top1 is missing or not a finite number ('0.9')"),
            ("train/b_string_network", "network is a string, not a network identity block"),
            ("train/c_above_one", "top1 is 5.0, not an accuracy in [0, 1]"),
            ("train/d_list_hparams", "network.hparams holds a value that is not a number"),
            ("probe/e", "test_accuracy is -0.1, not an accuracy in [0, 1]")):
        assert f"`{rel}/results.json`: {why}" in notes, rel
    assert "`separation2/class_separation.json`: results is a string; skipped." in notes
    assert "`separation3/class_separation.json`: results[0] is not a result per layer" in notes
    assert "`deep/results.json`: cannot be read as JSON (RecursionError" in notes
    assert "500.00" not in report.split("## Notes")[0]                # not shown as 500%
    _, rows = table_rows(report)
    assert rows["Softmax"][1].startswith("2 (0, 1)")      # the good run is used
    assert (out / "fig1_top1_vs_transfer.png").exists() and (out / "fig4_class_separation.png"
                                                             ).exists()


def test_every_reason_of_a_bad_file_can_be_read():
    """problems() is a generator and read_results() shows its first reason; reading on must not
    fail where a later check relies on a field an earlier one found unusable."""
    for kind, r, first in (
            ("train", {"network": "softmax_s0", "top1": 0.9}, "network is a string"),
            ("cka", {"networks": "x", "layers": ["pool"]}, "networks is not a non-empty"),
            ("class_separation", {"networks": [], "results": []}, "networks is not a non-empty"),
            ("linear_probe", {"test_accuracy": None}, "test_accuracy is missing")):
        reasons = list(make_figures.problems(kind, r))
        assert reasons and reasons[0].startswith(first), reasons


def test_sections_return_their_notes(tmp_path):
    """A report section gives back its lines, verdicts and notes (issue 28): with nothing to
    show, no lines and one note saying what was skipped; nothing is written."""
    figures = make_figures.Figures(str(tmp_path), ["png"], 50, {}, [])
    for section in (make_figures.section_class_separation({}, figures),
                    make_figures.section_sweeps({}, {}, figures),
                    make_figures.section_slopes([], {}, {}, figures),
                    make_figures.section_results({}, [], {}, {}, figures)):
        assert isinstance(section, make_figures.Section)
        assert section.lines == [] and not section.verdicts and len(section.notes) == 1
        assert "skipped" in section.notes[0]
    assert make_figures.section_layers([], {}) == make_figures.Section([])
    assert figures.written == [] and os.listdir(tmp_path) == []

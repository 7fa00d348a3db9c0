"""The CIFAR-10 coarse study's driver (results/cifar10_coarse/study.py): its committed
learning-rate grid is complete, its networks train in the order the analysis needs, and its
fine-tuning grid grows past a winning edge. Nothing here trains; run_all and run_step are
replaced by recorders."""
import importlib.util
import json
import os
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "study", os.path.join(ROOT, "results", "cifar10_coarse", "study.py"))
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)
sys.path.insert(0, os.path.dirname(spec.origin))  # one_rate and its report import study, beside it


def test_committed_grid_chooses_every_rate():
    """A fresh clone must not rerun the grid: every objective's rate is chosen from committed
    results.json files, and the choices are the ones the README's selection table states."""
    chosen = {o: study.next_lr(o) for o in study.OBJECTIVES}
    assert chosen == {"softmax": ("chosen", 1.6), "label_smoothing": ("chosen", 0.8),
                      "cosine_softmax": ("chosen", 0.1), "squared_error": ("chosen", 0.1)}


def test_cka_set_trains_first(monkeypatch):
    """CKA needs all of CKA_SET's weights in one session, so those networks come first."""
    calls = []
    monkeypatch.setattr(study, "run_all", lambda cmds, jobs, dry_run: calls.append(cmds))
    monkeypatch.setattr(study, "print_lrs", lambda: None)
    study.train(jobs=2, dry_run=True)
    networks = [os.path.basename(c[c.index("--out") + 1]) for c in calls[-1]]
    assert sorted(networks[:len(study.CKA_SET)]) == sorted(study.CKA_SET)
    assert sorted(networks) == sorted(f"{n}_s{s}" for n, (_, _, seeds) in study.NETWORKS.items()
                                      for s in seeds)
    lr = {os.path.basename(c[c.index("--out") + 1]): c[c.index("--lr") + 1] for c in calls[-1]}
    assert lr["softmax_s3"] == "1.6" and lr["label_smoothing_a0.4_s1"] == "0.8"


def finetune_lrs(monkeypatch, tmp_path, grid, best):
    """The --lrs that study.finetune asks for, given a finished fine-tune with `grid` scored."""
    out = tmp_path / "ft"
    (out / "grid").mkdir(parents=True)
    for lr in grid:
        (out / "grid" / f"lr{lr:g}_wd8e-05").mkdir()
    (out / "results.json").write_text(json.dumps(
        {"best_lr": best, "grid": {f"lr={lr:g},wd=8e-05": 0.5 for lr in grid}}))
    calls = []
    monkeypatch.setattr(study, "run_step", lambda what, cmd, dry_run: calls.append(cmd))
    study.finetune("ckpt.pt", str(out), dry_run=True)
    return [float(x) for x in calls[0][calls[0].index("--lrs") + 1:calls[0].index("--wds")]] \
        if calls else None


def test_finetune_grid_grows_past_a_winning_edge(monkeypatch, tmp_path):
    assert finetune_lrs(monkeypatch, tmp_path / "a", [0.03, 0.1, 0.3], 0.1) is None  # done
    assert finetune_lrs(monkeypatch, tmp_path / "b", [0.03, 0.1, 0.3], 0.3) == \
        [0.03, 0.1, 0.3, 0.9]
    assert finetune_lrs(monkeypatch, tmp_path / "c", [0.03, 0.1, 0.3], 0.03) == \
        [0.01, 0.03, 0.1, 0.3]


def test_more_starts_the_second_groups_grids(monkeypatch, tmp_path):
    """`train --more` adds the five other objectives' grids (rule 5); without it they never run.
    (In an empty study folder, so that every grid is still to run.)"""
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    calls = []
    monkeypatch.setattr(study, "run_all", lambda cmds, jobs, dry_run: calls.append(cmds))
    monkeypatch.setattr(study, "print_lrs", lambda: None)
    study.train(jobs=2, dry_run=True, more=True)
    grid = {(c[c.index("--objective") + 1], c[c.index("--lr") + 1]) for c in calls[0]}
    assert {o for o, _ in grid} == set(study.OBJECTIVES) | set(study.MORE_OBJECTIVES)
    assert ("dropout", "1.6") in grid and ("logit_normalization", "0.1") in grid
    assert all(c[c.index("--epochs") + 1] == str(study.GRID_EPOCHS) for c in calls[0])
    calls.clear()
    study.train(jobs=2, dry_run=True)
    assert calls and not any(c[c.index("--objective") + 1] in study.MORE_OBJECTIVES
                             for cmds in calls for c in cmds)


def fake_network(root, folder, name, lr, r2, accs):
    """The files network_numbers reads, for one network with probe accuracies `accs` (%)."""
    train = root / folder / "train" / name
    train.mkdir(parents=True)
    (train / "args.json").write_text(json.dumps({"lr": lr}))
    (train / "results.json").write_text(json.dumps({"top1": 0.85, "val_top1": 0.85}))
    sep = root / folder / "separation" / name
    sep.mkdir(parents=True)
    (sep / "class_separation.json").write_text(json.dumps({"results": [{"layers": {"pool": {
        "r2": r2, "sparsity": 0.9, "dim": 5.0}}}]}))
    for t, acc in zip(study.POOL_TARGETS, accs):
        probe = root / folder / "probe" / name / study.TARGETS[t][2]
        probe.mkdir(parents=True)
        (probe / "results.json").write_text(json.dumps({"test_accuracy": acc / 100}))


def control_verdict(monkeypatch, tmp_path, control_means):
    """control.md's verdict with softmax (1.6) at probe means 50 +- 0.5, squared error at 65."""
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    for s, m in enumerate((49.5, 50.5, 50.0, 50.2)):
        fake_network(tmp_path, "runs", f"softmax_s{s}", 1.6, 0.65, [m] * 3)
    for s, m in enumerate((64.5, 65.5, 65.0)):
        fake_network(tmp_path, "runs", f"squared_error_s{s}", 0.1, 0.75, [m] * 3)
    for s, m in enumerate(control_means):
        fake_network(tmp_path, "control", f"softmax_lr0.1_s{s}", 0.1, 0.3, [m] * 3)
    text = study.control_report()
    assert "| softmax (study) | 4 | 1.6 | 85.00 ± 0.00 | 0.650 ± 0.000 |" in text
    assert "| cosine_softmax_t0.05 (study) | 0 | - |" in text    # absent networks: no numbers
    return text.split("Verdict: **")[1].split("**")[0] if "Verdict" in text else None


def test_control_rule(monkeypatch, tmp_path):
    """The control's pre-registered rule (README.md): loss's, learning rate's, or both."""
    assert control_verdict(monkeypatch, tmp_path / "a", (50.3, 50.6)) == "the deficit is the loss's"
    assert control_verdict(monkeypatch, tmp_path / "b", (64.8, 65.4)) == \
        "the deficit is the learning rate's"
    assert control_verdict(monkeypatch, tmp_path / "c", (57.9, 58.1)) == "both"
    assert control_verdict(monkeypatch, tmp_path / "d", (58.0,)) is None   # one seed: waits


def load_one_rate():
    s = importlib.util.spec_from_file_location("one_rate", os.path.join(
        ROOT, "results", "cifar10_coarse", "one_rate.py"))
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module


def test_one_rate_trains_the_cka_set_first_and_reuses_committed_networks():
    one_rate = load_one_rate()
    nets = one_rate.networks()
    assert nets[:len(one_rate.CKA_SET)] == one_rate.CKA_SET
    assert {n.objective for n in one_rate.CKA_SET} == set(one_rate.SPEC_NETS)   # all nine
    arm_a = [n for n in nets if n.folder == "lr0.1" and not n.rerun]
    assert len(arm_a) == 9 * 3
    reruns = [n for n in nets if n.rerun]   # last: reused and first-protocol ones, for dead units
    assert nets[-len(reruns):] == reruns and len(reruns) == 7 + 12
    assert all("/reruns/" in n.out and one_rate.reused_source(n) is None for n in reruns)
    assert {n.folder for n in nets if not n.rerun} == {"lr0.1", "lr0.4", "lr1.6", "lr0.1_wd0.00128"}
    reused = [n for n in nets if one_rate.reused_source(n)]
    assert {(n.folder, n.name) for n in reused} == {(n.folder, n.name) for n in reruns[:7]}
    # the first protocol's other networks, each with the command that trained it (args.json)
    for net in reruns[7:]:
        cmd = net.command()
        with open(os.path.join(ROOT, "results", "cifar10_coarse", "runs", "train", net.name,
                               "args.json")) as f:
            made = json.load(f)
        flag = {"label_smoothing": "--alpha", "cosine_softmax": "--tau"}[net.objective]
        assert (float(cmd[cmd.index("--lr") + 1]), int(cmd[cmd.index("--seed") + 1]),
                float(cmd[cmd.index(flag) + 1])) == \
            (made["lr"], made["seed"], made[flag[2:]]), net.name
    assert [n.seed for n in reruns[7:]] == [0] * 6 + [1] * 6     # one seed of each first
    # committed networks with this exact recipe are copied, except where weights are needed
    assert {f"{n.folder}/{n.name}" for n in reused} == {
        "lr0.1/squared_error_s1", "lr0.1/squared_error_s2", "lr0.1/cosine_softmax_t0.05_s1",
        "lr1.6/softmax_s0", "lr1.6/softmax_s1", "lr1.6/softmax_s2", "lr1.6/softmax_s3"}
    cmd = one_rate.Net("softmax", 0.1, 1, wd=16 * one_rate.WD).command()
    assert cmd[cmd.index("--weight-decay") + 1] == "0.00128" and cmd[cmd.index("--lr") + 1] == "0.1"
    se = one_rate.Net("squared_error", 1.6, 0).command()
    assert se[se.index("--loss-scale") + 1] == "0.005"


def test_one_rate_dry_run_says_what_it_skips(tmp_path, monkeypatch, capsys):
    """On the committed study every network is finished: the dry run printed nothing at all."""
    one_rate = load_one_rate()
    n = len(one_rate.networks())
    one_rate.train(jobs=2, dry_run=True)
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"0 of {n} networks to train; {n} already finished in ")
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))   # an empty folder: reuse, then train
    one_rate.train(jobs=2, dry_run=True)
    out = capsys.readouterr().out.splitlines()
    reused = sum(line.startswith("reuse ") for line in out)
    assert reused == 7 and out[-1].startswith(f"{n - 7} of {n} networks to train; 0 already")
    assert not os.listdir(tmp_path)   # a dry run writes nothing


def test_one_rate_records_a_diverged_run_and_goes_on(tmp_path, monkeypatch):
    one_rate = load_one_rate()
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))
    net = one_rate.Net("squared_error", 1.6, 0)
    os.makedirs(net.out)
    with open(os.path.join(net.out, "train.log"), "w") as f:
        f.write("epoch 1/30 ...\nerror: the loss became nan/inf at step 40 (epoch 1); training "
                "stopped. no checkpoint had been written yet: rerun with a lower --lr\n")
    assert one_rate.status(net) is None
    assert one_rate.mark_diverged(net, 2)
    assert one_rate.status(net) == "diverged"
    with open(os.path.join(net.out, "diverged.json")) as f:
        assert "step 40" in json.load(f)["message"]
    # a run that trained to chance level is diverged too; another failure is not a result
    other = one_rate.Net("softmax", 1.6, 1)
    os.makedirs(other.out)
    with open(os.path.join(other.out, "results.json"), "w") as f:
        json.dump({"val_top1": 0.2}, f)
    assert one_rate.mark_diverged(other, 0) and one_rate.status(other) == "diverged"
    third = one_rate.Net("softmax", 0.4, 1)
    os.makedirs(third.out)
    assert not one_rate.mark_diverged(third, 1)


def fake_one_rate_network(base, name, top1, probes, r2, sparsity=0.5, dead=0.1):
    """Committed JSON files of one network, as the study writes them (numbers as fractions)."""
    def write(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f)
    write(os.path.join(base, "train", name, "results.json"), {"top1": top1, "val_top1": top1,
                                                              "train_seconds": 1800.0})
    for (t, (_, _, folder)), acc in zip(study.TARGETS.items(), probes):
        write(os.path.join(base, "probe", name, folder, "results.json"),
              {"test_accuracy": acc, "seconds": 60.0})
    pool = {"r2": r2, "sparsity": sparsity, "dim": 10.0, **({} if dead is None else {"dead": dead})}
    write(os.path.join(base, "separation", name, "class_separation.json"),
          {"results": [{"layers": {"pool": pool}}]})


def test_one_rate_report_applies_the_preregistered_rules(tmp_path, monkeypatch):
    """Arm A with 3 seeds: sigmoid clearly worse, squared error equivalent to softmax within the
    margin, the rest clearly better: the title's claim 'depends on the objective'; then
    without sigmoid's deficit it is 'refuted'."""
    one_rate = load_one_rate()
    import one_rate_report as report
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))
    monkeypatch.setattr(report, "one_rate", one_rate)
    shift = {"softmax": 0.0, "sigmoid": -0.05, "squared_error": 0.001}
    for net in one_rate.networks():
        if net.folder != "lr0.1":
            continue
        d = shift.get(net.objective, 0.04) + 0.001 * net.seed
        fake_one_rate_network(os.path.join(str(tmp_path), "lr0.1"), net.name, 0.85 + d,
                     [0.6 + d, 0.5 + d, 0.8 + d, 0.6], 0.4 - d, sparsity=0.9, dead=0.85)
    configs = report.configurations()
    comps = report.primary(configs, "mean")
    assert comps["sigmoid"]["verdict"] == "worse"
    assert comps["squared_error"]["verdict"] == "no different"
    assert comps["dropout"]["verdict"] == "better"
    assert comps["dropout"]["p_holm"] >= comps["dropout"]["p"]
    assert report.claim_verdict(comps, "mean") == "depends on the objective"
    comps["sigmoid"]["verdict"] = "better"
    assert report.claim_verdict(comps, "mean") == "refuted"
    # Holm over the 8 waits for all 8: with dropout at one seed, no row has an adjusted p or a
    # verdict (adjusted over the 7 there are, p would be smaller than the plan's)
    partial = {k: (v[:1] if k[0] == "dropout" else v) for k, v in configs.items()}
    comps = report.primary(partial, "mean")
    assert comps["dropout"] is None and "verdict" not in comps["sigmoid"]
    assert report.holm_cells(comps["sigmoid"])[2] == "waits (Holm over all 8)"
    assert report.claim_verdict(comps, "mean").startswith("waits (7 of 8 objectives")
    assert report.dead_or_sparse(0.9, 0.85) == "dead units"
    assert report.dead_or_sparse(0.9, 0.1) == "sparse codes"
    assert report.dead_or_sparse(0.9, 0.4) == "both"
    failed = one_rate.Net("softmax", 0.4, 0)
    os.makedirs(failed.out)
    open(os.path.join(failed.out, "FAILED"), "w").write("exit 1: error: boom (log: x.log)\n")
    report.write_report()
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    assert "Networks finished: 27 of" in text and "**depends on the objective**" in text
    assert "- `lr0.4/softmax_s0` failed: exit 1: error: boom (log: x.log)" in text  # named, why
    assert "Missing, not trained yet (" in text and "`lr1.6/softmax_s1`" in text
    # the cost counts what this protocol ran: not the 3 reused copies at lr 0.1
    assert "| networks trained to the end (arms A, B, C) | 24 | 12.0 |" in text
    assert "| linear probes, feature extraction included | 96 | 1.6 |" in text
    assert "Total **13.6 process-hours**" in text
    # no network of arm B: its interactions say why they have no interval
    assert "| 0.4 vs 0.1 | mean | - | **cannot tell (a cell has < 2 seeds)** |" in text


def test_a_cell_whose_seeds_all_diverged_reads_diverged_in_every_comparison(tmp_path,
                                                                             monkeypatch):
    """The plan's divergence rule: squared error at 1.6 diverged on both seeds, label
    smoothing at 1.6 on one of two; the rate table, the change with the rate, the interaction
    and arm C say 'diverged' where a cell has no trained seed and give the count beside a
    partly diverged one (the report used to print '-' and 'a cell has < 2 seeds')."""
    one_rate = load_one_rate()
    import one_rate_report as report
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))
    monkeypatch.setattr(report, "one_rate", one_rate)
    trained = [("softmax", lr, s) for lr in (0.1, 1.6) for s in (0, 1)] + \
        [(o, 0.1, s) for o in ("squared_error", "label_smoothing") for s in (0, 1)] + \
        [("label_smoothing", 1.6, 0)]
    diverged = [one_rate.Net("squared_error", 1.6, s) for s in (0, 1)] + \
        [one_rate.Net("label_smoothing", 1.6, 1)] + \
        [one_rate.Net("softmax", 0.1, s, wd=16 * one_rate.WD) for s in (0, 1)]
    for o, lr, s in trained:
        net = one_rate.Net(o, lr, s)
        fake_one_rate_network(net.base, net.name, 0.85, [0.6 + 0.01 * s] * 4, 0.4 + 0.01 * s)
    for net in diverged:
        os.makedirs(net.out)
        open(os.path.join(net.out, "diverged.json"), "w").write('{"diverged": true}')
    text = "\n".join(report.section_rates(report.configurations()))
    assert "| squared_error | 1.6 | diverged | diverged | diverged | diverged | diverged | 2 |" \
        in text
    assert "| squared_error | 0.1 -> 1.6 (squared_error at 1.6: 2 of 2 diverged) | diverged | " \
        "diverged |" in text
    for key in ("mean", "r2"):
        assert f"| squared_error | 1.6 vs 0.1 (squared_error at 1.6: 2 of 2 diverged) | {key} | " \
            "diverged | **diverged** |" in text
        assert f"| label_smoothing | 1.6 vs 0.1 (label_smoothing at 1.6: 1 of 2 diverged) | " \
            f"{key} | - | **cannot tell (a cell has < 2 seeds)** |" in text
    assert "| label_smoothing | 0.1 -> 1.6 (label_smoothing at 1.6: 1 of 2 diverged) | " in text
    assert "| softmax | 1.6 vs" not in text          # softmax is the reference, not a row
    arm_c = text[text.index("### Arm C"):]
    assert arm_c.count("**diverged**") == 2 and "waits" not in arm_c


def test_a_study_goes_on_past_a_failed_network_and_lists_every_failure(tmp_path, capsys):
    """Three runs, two fail: the third still runs; both failures are listed with their error
    and log and recorded in FAILED (the report's source); the study exits 2. A rerun clears a
    FAILED record before it tries again."""
    fail = "import sys; print('step 1'); print('error: loss is nan/inf'); sys.exit(2)"
    crash = "raise RuntimeError('oops')"
    ok = "import os, sys; open(os.path.join(sys.argv[2], 'ran'), 'w')"
    outs = [str(tmp_path / n) for n in ("a", "b", "c")]
    cmds = [[sys.executable, "-c", code, "--out", out] for code, out in zip((fail, crash, ok), outs)]
    with pytest.raises(study.common.UserError, match="2 of 3 runs failed"):
        study.run_all(cmds, 1, False)
    printed = capsys.readouterr().out
    assert os.path.exists(os.path.join(outs[2], "ran")) and not os.path.exists(
        os.path.join(outs[2], "FAILED"))
    assert open(os.path.join(outs[0], "FAILED")).read().startswith("exit 2: error: loss is nan/inf")
    assert "RuntimeError: oops" in open(os.path.join(outs[1], "FAILED")).read()
    assert printed.count("train.log)") == 2 and "FAILED: " in printed
    study.run_logged([sys.executable, "-c", "pass"], outs[0])
    assert not os.path.exists(os.path.join(outs[0], "FAILED"))


def test_ols_slope_equals_the_simple_fit_and_adjusts_for_a_covariate():
    import numpy as np
    import one_rate_report as report
    from make_figures import slope_fit
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, 9)
    y = 70 - 20 * x + rng.normal(0, 0.5, 9)
    a, b = report.ols(y, [x]), slope_fit(list(zip(x, y)))
    for k in ("slope", "low", "high", "p"):
        assert a[k] == pytest.approx(b[k], rel=1e-9)
    z = rng.uniform(0, 1, 9)                  # a covariate that carries all of the effect
    y2 = 70 - 10 * z + 0.0 * x + rng.normal(0, 0.1, 9)
    adjusted = report.ols(y2, [x, z])
    assert adjusted["low"] < 0 < adjusted["high"]
    assert report.ols(y[:2], [x[:2]]) is None  # no degrees of freedom left


def test_a_rerun_lends_its_dead_units_only_when_it_reproduced_the_reused_record(tmp_path,
                                                                               monkeypatch):
    one_rate = load_one_rate()
    import one_rate_report as report
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))
    monkeypatch.setattr(report, "one_rate", one_rate)
    net = one_rate.Net("softmax", 1.6, 0)
    rerun = one_rate.Net("softmax", 1.6, 0, rerun=True)
    fake_one_rate_network(net.base, net.name, 0.85, [0.5, 0.5, 0.5, 0.5], 0.6, 0.97, dead=None)
    fake_one_rate_network(rerun.base, rerun.name, 0.85, [0.5] * 4, 0.6, 0.97, dead=0.9)
    for base in (net.base, rerun.base):
        path = os.path.join(base, "train", net.name, "results.json")
        json.dump({"top1": 0.85, "val_top1": 0.85, "test_loss": 0.4}, open(path, "w"))
    assert one_rate.rerun_matches(rerun)
    assert report.configurations()[("softmax", 1.6, one_rate.WD)][0]["dead"] == 0.9
    json.dump({"top1": 0.85, "val_top1": 0.85, "test_loss": 0.41},
              open(os.path.join(rerun.out, "results.json"), "w"))
    assert not one_rate.rerun_matches(rerun)
    assert "dead" not in report.configurations()[("softmax", 1.6, one_rate.WD)][0]
    assert report.mismatched_reruns() == ["lr1.6/softmax_s0"]
    # a first-protocol network is checked against its own committed record in runs/train
    first = next(n for n in one_rate.networks() if n.name == "cosine_softmax_t0.2_s1")
    with open(os.path.join(ROOT, "results", "cifar10_coarse", "runs", "train", first.name,
                           "results.json")) as f:
        record = json.load(f)
    fake_one_rate_network(first.base, first.name, record["top1"], [0.5] * 4, 0.3, 0.5, dead=0.05)
    json.dump({**record, "test_loss": record["test_loss"] + 1e-9},
              open(os.path.join(first.out, "results.json"), "w"))
    assert one_rate.rerun_matches(first) is False
    json.dump(record, open(os.path.join(first.out, "results.json"), "w"))
    assert one_rate.rerun_matches(first)
    seeds, planned = report.first_protocol_cells()[("cosine_softmax_t0.2", 0.1)]
    assert planned == 2 and [s["dead"] for s in seeds] == [0.05]
    assert report.dead_row(seeds) == ["0.500", "0.050 (0.050-0.050)", "0.474", "sparse codes"]


def test_bad_arguments_are_one_line_with_status_2(tmp_path):
    """study.py printed argparse's usage block, exited 1 on its errors and took --jobs 0."""
    import subprocess
    script = os.path.join(ROOT, "results", "cifar10_coarse", "study.py")
    for args, env, message in (
            (["train", "--jobs", "0"], {}, "argument --jobs: '0' must be > 0"),
            (["train", "--jobs", "-1"], {}, "argument --jobs: '-1' must be > 0"),
            (["train"], {"JOBS": "two"}, "argument --jobs: 'two' is not an integer"),
            (["trian"], {}, "invalid choice: 'trian'"),
            (["lrs"], {"SHARED": str(tmp_path / "none")}, "data folder not found")):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                           env={**os.environ, **env}, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, \
            r.stderr
        assert r.stderr.count("\n") == 1 and r.stdout == ""
    script = os.path.join(ROOT, "results", "cifar10_coarse", "one_rate.py")
    for stage in ("analyze", "report"):     # a mistyped ONE_RATE_DIR writes no empty report
        r = subprocess.run([sys.executable, script, stage], capture_output=True, text=True,
                           env={**os.environ, "ONE_RATE_DIR": str(tmp_path / "typo")}, cwd=ROOT,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: no such folder: "), r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "typo").exists()


def test_one_rate_keeps_a_diverged_run_as_a_result_and_records_a_crash(tmp_path, monkeypatch):
    one_rate = load_one_rate()
    monkeypatch.setattr(one_rate, "OUT", str(tmp_path))
    code = {"squared_error": "import sys; print('error: the loss is nan/inf at step 3'); "
                             "sys.exit(2)", "softmax": "raise MemoryError"}
    monkeypatch.setattr(one_rate.Net, "command",
                        lambda self: [sys.executable, "-c", code[self.objective]])
    diverged, crashed = one_rate.Net("squared_error", 1.6, 0), one_rate.Net("softmax", 1.6, 0)
    assert one_rate.train_one(diverged) == ("diverged: lr1.6/squared_error_s0", None)
    assert one_rate.status(diverged) == "diverged"
    assert not os.path.exists(os.path.join(diverged.out, "FAILED"))
    what, failure = one_rate.train_one(crashed)
    assert what == "FAILED: lr1.6/softmax_s0" and "MemoryError" in failure
    assert one_rate.status(crashed) is None and os.path.exists(os.path.join(crashed.out, "FAILED"))


def test_probe_folders_are_linear_probes_own():
    """TARGETS' folders come from linear_probe.pair_dir, and they are the folders that
    linear_probe.py wrote for the committed networks."""
    for t, (_, _, folder) in study.TARGETS.items():
        assert os.path.isfile(os.path.join(study.HERE, "runs", "probe", "softmax_s0", folder,
                                           "results.json")), t


def test_study_runs_as_a_script_from_anywhere(tmp_path):
    """study.py finds the repository's modules (common, linear_probe, make_figures) by their
    files, not by a sys.path entry: run as a script from another folder, it starts."""
    import subprocess
    script = os.path.join(ROOT, "results", "cifar10_coarse", "study.py")
    r = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "control" in r.stdout, r.stderr[-500:]
    with open(script) as f:
        assert "sys.path.insert" not in f.read()


def test_interaction_interval_is_welchs_and_covers_at_its_level():
    """Rule 2's interval: for two cells it is scipy's Welch interval exactly; for the four
    cells of an interaction, simulated 95% intervals cover the true value about 95% of the
    time with unequal variances and seed counts like the study's (2 and 3)."""
    import numpy as np
    from scipy import stats
    import one_rate_report as report
    rng = np.random.default_rng(0)
    a, b = rng.normal(68, 0.5, 3), rng.normal(65, 1.5, 2)
    ours = report.welch_of_cells([a, b], [1, -1])
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (ours["low"], ours["high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert ours["est"] == pytest.approx(a.mean() - b.mean())
    means, sds, ns, signs = [68, 50, 69, 62], [0.2, 0.4, 0.8, 1.6], [3, 2, 2, 3], [1, -1, -1, 1]
    truth = sum(s * m for s, m in zip(signs, means))
    covered = 0
    for _ in range(4000):
        w = report.welch_of_cells([rng.normal(m, s, n) for m, s, n in zip(means, sds, ns)], signs)
        covered += w["low"] <= truth <= w["high"]
    assert 0.93 <= covered / 4000 <= 0.975
    assert report.welch_of_cells([a, b[:1]], [1, -1]) is None   # a cell of one seed: no interval
    assert report.welch_of_cells([[1.0, 1.0], [2.0, 2.0]], [1, -1]) == \
        {"est": -1.0, "low": -1.0, "high": -1.0}

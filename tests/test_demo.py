"""The demo sequence (demo.sh) at its smallest setting: every step runs, every file appears."""
import os
import subprocess
import sys

from conftest import ROOT

OBJECTIVES = ["softmax", "logit_normalization", "squared_error"]


def small_demo_env(out, **settings):
    """demo.sh's environment for the smallest run: seed 0, 1 epoch, 2 jobs, a 1-point
    fine-tuning grid, 3 lambdas and 96 CKA images, plus `settings`."""
    return {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "SEEDS": "0", "EPOCHS": "1",
            "JOBS": "2", "FT_ARGS": "--lrs 0.1 --wds 1e-4 --epochs 1 --batch-size 64",
            "PROBE_ARGS": "--lambdas 1e-4,1e-2,1", "CKA_ARGS": "--split test --max-images 96",
            **settings}


def test_demo_smallest_setting(tmp_path):
    out = tmp_path / "demo"
    env = small_demo_env(out, OBJECTIVES=" ".join(OBJECTIVES))
    r = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = out / "runs"
    for objective in OBJECTIVES:
        label = f"{objective}_s0"
        for f in ("final.pt", "results.json", "summary.csv", "log.jsonl", "args.json"):
            assert (runs / "train" / label / f).is_file(), (label, f)
        assert (runs / "probe" / label / "digits@5-9" / "results.json").is_file()
        assert (runs / "finetune" / label / "digits@5-9" / "results.json").is_file()
        assert not list((runs / "finetune" / label).rglob("*.pt"))  # scores only
        assert not (runs / "train" / label / "last.pt").exists()  # resume state dropped
    for f in ("probe/summary.csv", "cka/cka.npz", "cka/cka.json",
              "class_separation/class_separation.json"):
        assert (runs / f).is_file(), f
    for fig in ("fig1_top1_vs_transfer", "fig2_table", "fig3_cka_by_layer", "fig3_cka_matrices",
                "fig4_class_separation"):
        assert (out / f"{fig}.png").is_file() and (out / f"{fig}.pdf").is_file(), fig
    # the demo's disk use (issue 14): final.pt of ResNet-18 at 5 classes is 45 MB (EMA weights
    # only), nothing else is large; the full demo (18 networks) stays under 1 GB
    used = sum(p.stat().st_size for p in runs.rglob("*") if p.is_file())
    assert used < 3 * 50e6 + 20e6, f"{used / 1e6:.0f} MB"
    report = (out / "report.md").read_text()
    rows = [l for l in report.splitlines() if l.startswith("| ")]
    for name in ("Softmax", "Logit normalization", "Squared error"):
        assert any(l.startswith(f"| {name} | 1 ") for l in rows), name
    # every result joined to its training run by run id (issue 12): nothing left over
    for unjoined in ("no identity block", "no run id", "without a training results.json",
                     "not that run's final.pt"):
        assert unjoined not in report, unjoined
    # a second run finds everything done and only redoes the analyses
    again = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train:" not in again.stdout


def test_a_failed_network_does_not_stop_the_demo(tmp_path):
    """squared_error at the other objectives' rate (LR=0.8) diverges: exit 2 with one line. The
    demo records it (FAILED in its folder, a console line), trains, probes, fine-tunes and
    reports the other network, names the failed one in report.md, and exits 1 at the end."""
    out = tmp_path / "demo"
    env = small_demo_env(out, OBJECTIVES="squared_error softmax", LR="0.8")
    r = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    runs = out / "runs"
    failed = (runs / "train" / "squared_error_s0" / "FAILED").read_text().strip()
    assert failed.startswith("exit 2: error: the loss became nan/inf at step ") and \
        failed.endswith("(log: " + str(runs / "logs" / "train_squared_error_s0.log") + ")")
    assert "rerun with --lr 5e-05 (squared_error trained on digits and CIFAR-10" in failed
    assert f"FAILED: {runs}/train/squared_error_s0: {failed}" in r.stderr
    for step in ("probe", "finetune"):     # the later steps went on without it
        assert (runs / step / "softmax_s0" / "digits@5-9" / "results.json").is_file()
        assert not (runs / step / "squared_error_s0").exists()
    for step in ("cka/cka.json", "class_separation/class_separation.json"):
        assert "squared_error" not in (runs / step).read_text()
    report = (out / "report.md").read_text()
    assert ("- `train/squared_error_s0` failed, so this network is missing from every result: "
            + failed) in report
    assert "| Softmax | 1 (0) |" in report
    tail = r.stderr.strip().splitlines()[-2:]
    assert tail[0] == "   train/squared_error_s0: " + failed
    assert "with 1 failure(s), listed above" in tail[1]


def test_demo_analyses_given_checkpoints_without_training(tmp_path):
    """CHECKPOINTS= (e.g. the paper's imported networks): no training; each network is scored
    with train_imagenet.py --evaluate (its source top-1), then probed, compared and reported,
    every result joined by run id."""
    import train_imagenet
    labels = ["softmax_s0", "sigmoid_s0"]
    for label in labels:
        train_imagenet.main(["--data", "digits@0-4", "--objective", label[:-3], "--arch",
                             "resnet18", "--resolution", "8", "--epochs", "1", "--workers", "0",
                             "--threads", "1", "--out", str(tmp_path / "nets" / label)])
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "JOBS": "1",
           "OMP_NUM_THREADS": "1", "CHECKPOINTS": f"{tmp_path}/nets/*/final.pt",
           "FT_TARGETS": "", "PROBE_ARGS": "--lambdas 1e-4,1e-2,1",
           "CKA_ARGS": "--split test --max-images 96"}
    r = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "train:" not in r.stdout and not (out / "runs" / "train").exists()
    for label in labels:
        assert (out / "runs" / "evaluate" / label / "results.json").is_file()
        assert (out / "runs" / "probe" / label / "digits@5-9" / "results.json").is_file()
    report = (out / "report.md").read_text()
    assert "2 evaluate results.json" in report and "source top-1 of 2 from" in report
    for unjoined in ("no identity block", "no run id", "not that run's final.pt"):
        assert unjoined not in report, unjoined
    assert (out / "fig1_top1_vs_transfer.png").is_file()
    bad = subprocess.run(["bash", "demo.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "CHECKPOINTS": str(tmp_path / "none.pt")})
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr

"""finetune.py: end to end from a digits@0-4 checkpoint to digits@5-9, selection on val only,
resume after a kill, finished grid points read back, one-line errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import finetune
import train_imagenet
from conftest import ROOT, non_finite_copy, one_line_error, read_only

FT = ["--epochs", "2", "--batch-size", "64", "--wds", "1e-4", "--log-every", "1000"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "softmax_s0"
    train_imagenet.main(["--data", "digits@0-4", "--objective", "cosine_softmax", "--epochs", "3",
                         "--out", str(out), "--log-every", "1000"])
    return str(out / "final.pt")


def test_end_to_end_selects_on_val_and_tests_once(source, tmp_path, monkeypatch, capsys):
    fits, test_reads = [], []
    real_train, real_load = train_imagenet.train, common.load_dataset

    def spy_train(model, model_args, data, *a, **k):
        fits.append(data.get("test") is not None)
        return real_train(model, model_args, data, *a, **k)

    real_getitem = common.ImageSource.__getitem__

    def spy_getitem(self, i):  # every image read, from any split (workers 0: in this process)
        test_reads.append((int(i), len(fits)))
        return real_getitem(self, i)
    monkeypatch.setattr(train_imagenet, "train", spy_train)
    monkeypatch.setattr(common.ImageSource, "__getitem__", spy_getitem)
    out = tmp_path / "ft"
    r = finetune.main(["--checkpoint", source, "--data", "digits@5-9", "--out", str(out),
                       "--lrs", "0.1", "0.4", "--workers", "0", "--keep-model", *FT])
    # three runs: two grid points without the test split, then the final one with it
    assert fits == [False, False, True]
    log = capsys.readouterr().out   # a counter and an ETA before each run
    assert "grid point 1 of 2: lr 0.1, wd 0.0001 | eta known after the first run (3 runs left)" \
        in log
    assert re.search(r"grid point 2 of 2: lr 0.4, wd 0.0001 \| eta \d\S* \(2 runs left\)", log)
    assert re.search(r"\(the final run\) \| eta \d\S* \(1 run left\)", log)
    test_idx = set(real_load("digits@5-9")["test"].indices.tolist())
    phases = {phase for i, phase in test_reads if i in test_idx}
    assert phases == {3}  # test images are read only during the final run
    assert {phase for _, phase in test_reads} == {1, 2, 3}
    saved = json.loads((out / "results.json").read_text())
    assert saved["metric"] == "top1" and saved["best_lr"] in (0.1, 0.4)
    assert saved["best_wd"] == 1e-4 and set(saved["grid"]) == {"lr=0.1,wd=0.0001",
                                                                "lr=0.4,wd=0.0001"}
    assert saved["best_val"] == max(saved["grid"].values())
    assert saved["test_accuracy"] > 0.5  # 5 classes: chance is 0.2
    source_net = saved["network"]                      # the identity of the source network
    assert source_net["objective"] == "cosine_softmax" and source_net["seed"] == 0
    assert source_net["run_id"] == torch.load(source, weights_only=True)["run_id"]
    assert (saved["kind"], saved["dataset"], saved["dataset_name"]) == (
        "finetune", "digits@5-9", "digits@5-9")
    assert saved["n_test"] == len(common.load_dataset("digits@5-9")["test"])
    ck = common.load_checkpoint(str(out / "final" / "final.pt"), num_classes=5)
    assert ck["objective"] == "softmax"  # a fresh linear head, trained with cross-entropy
    assert r["test_accuracy"] == saved["test_accuracy"]


def test_head_is_fresh_and_body_copied(source):
    model, info = common.load_pretrained(source)
    new = finetune.with_fresh_head(model, info, 7, seed=0)
    assert new.fc.out_features == 7 and isinstance(new.fc, common.nn.Linear)
    assert float(new.fc.bias.detach().abs().sum()) == 0
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            assert np.array_equal(value.numpy(), new.state_dict()[name].numpy()), name


def run(args, env=None):
    return subprocess.run([sys.executable, "finetune.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_kill_resume_and_no_recompute(source, tmp_path):
    out = str(tmp_path / "ft")
    args = ["--checkpoint", source, "--data", "digits@5-9", "--out", out, "--lrs", "0.2", *FT,
            "--keep-model"]
    killed = run(args, env={**os.environ, "KORNBLITH_TEST_HOOKS": "kill_at_step=12"})
    assert killed.returncode == -9
    point = os.path.join(out, "grid", "lr0.2_wd0.0001")
    assert os.path.exists(os.path.join(point, "last.pt"))
    assert not os.path.exists(os.path.join(point, "results.json"))
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(l) for l in open(os.path.join(point, "log.jsonl"))]
    assert any(rec.get("event") == "resume" for rec in log)
    # finished runs keep no resume state; a grid point keeps only its results (val score)
    final = os.path.join(out, "final")
    assert not os.path.exists(os.path.join(point, "last.pt"))
    assert not os.path.exists(os.path.join(point, "final.pt"))
    assert not os.path.exists(os.path.join(final, "last.pt"))
    assert os.path.exists(os.path.join(final, "final.pt"))
    stamps = {p: os.path.getmtime(os.path.join(p, "results.json")) for p in (point, final)}
    stamps[final + "/final.pt"] = os.path.getmtime(os.path.join(final, "final.pt"))
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished") == 2
    assert all(os.path.getmtime(p if p.endswith(".pt") else os.path.join(p, "results.json")) == t
               for p, t in stamps.items())


def test_bad_inputs_one_line(source, tmp_path):
    cases = [
        (["--checkpoint", source, "--arch", "resnet50"], "is a resnet18"),
        (["--checkpoint", source, "--lrs"], "empty grid"),
        (["--checkpoint", source, "--wds"], "empty grid"),
        (["--checkpoint", source, "--lrs", "-1"], "must be > 0"),
        (["--checkpoint", source, "--epochs", "0"], "must be > 0"),
        (["--checkpoint", source, "--momentum", "-1"], "must be in [0, 1)"),
        (["--checkpoint", source, "--workers", "-1"], "must be >= 0"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        # the grid gives the rate and the decay: the shared training flags are refused, not
        # dropped (--lr 0.05 --lrs 0.1 used to train at 0.1 without a word)
        (["--checkpoint", source, "--lr", "0.05", "--lrs", "0.1"],
         "--lr is not used by finetune.py: its grid --lrs gives the values to try"),
        (["--checkpoint", source, "--weight-decay", "1e-3"], "its grid --wds gives"),
        # the checkpoint is the problem, not the learning rate its nan loss used to blame
        (["--checkpoint", non_finite_copy(source, tmp_path / "nan.pt", "layer1.0.conv1.weight")],
         "nan.pt holds non-finite weights (model tensor layer1.0.conv1.weight has NaN)"),
    ]
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tiny / "t_train.npz", images=images, labels=np.arange(3))
    np.savez(tiny / "t_test.npz", images=images, labels=np.arange(3))
    cases.append((["--checkpoint", source, "--data", f"npz:{tiny}"], "too few images"))
    for extra, message in cases:
        argv = ["--data", "digits@5-9", "--out", str(tmp_path / "o"), *FT, *extra]
        r = run(argv)
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, r.stderr)
        assert "lower --lr" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "'0' must be > 0"), (["--batch-size", "-4"], "'-4' must be > 0"),
    (["--log-every", "0"], "must be > 0"), (["--resolution", "0"], "must be in [1, 4096]"),
    (["--warmup-epochs", "-1"], "must be >= 0"), (["--ema-epochs", "-1"], "must be >= 0"),
    (["--ckpt-minutes", "nan"], "not a finite number"), (["--momentum", "-1"], r"in [0, 1)"),
    (["--device", "foo"], "unknown device 'foo'"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flags, message):
    argv = ["--checkpoint", str(tmp_path / "x.pt"), "--data", "digits@5-9", "--out",
            str(tmp_path / "o"), *flags]
    assert message in one_line_error(capsys, lambda: finetune.main(argv))
    assert not os.path.exists(tmp_path / "o" / "grid")


def test_a_read_only_output_folder_is_refused(source, tmp_path, capsys, monkeypatch):
    read_only(monkeypatch, tmp_path / "ro")
    argv = ["--checkpoint", source, "--data", "digits@5-9", "--out", str(tmp_path / "ro" / "o")]
    err = one_line_error(capsys, lambda: finetune.main(argv))
    assert "cannot write into" in err and "Read-only file system" in err


def test_step_budget(source, tmp_path):
    out = tmp_path / "steps"
    r = finetune.main(["--checkpoint", source, "--data", "digits@5-9", "--out", str(out),
                       "--lrs", "0.1", "--steps", "13", *FT])
    assert r["steps"] == 13  # 10 steps per epoch at batch 64: the second epoch is cut
    grid = json.loads((out / "grid" / "lr0.1_wd0.0001" / "results.json").read_text())
    assert grid["steps"] == 13 and grid["val_top1"] is not None



def test_no_model_is_kept_unless_asked(source, tmp_path):
    out = tmp_path / "lean"
    r = finetune.main(["--checkpoint", source, "--data", "digits@5-9", "--out", str(out),
                       "--lrs", "0.2", "--workers", "0", *FT])
    assert r["final_checkpoint"] is None and r["test_accuracy"] > 0.2
    assert not list(out.rglob("*.pt"))  # scores only: the demo's disk use (issue 14)
    again = finetune.main(["--checkpoint", source, "--data", "digits@5-9", "--out", str(out),
                           "--lrs", "0.2", "--workers", "0", *FT])
    assert again["test_accuracy"] == r["test_accuracy"]  # read back, not retrained


def test_a_fine_tune_shares_its_folder_with_nothing_else(source, tmp_path, capsys):
    """Fine-tuning into a training run's folder replaced its results.json; a fine-tune of
    another network into a fine-tune's folder its results (issue 25). Both refused at once."""
    train_dir = os.path.dirname(source)
    before = open(os.path.join(train_dir, "results.json")).read()
    argv = ["--checkpoint", source, "--data", "digits@5-9", *FT]
    err = one_line_error(capsys, lambda: finetune.main([*argv, "--out", train_dir]))
    assert "holds results of another kind (training: results.json of kind train); " \
           "fine-tuning results need a folder of their own" in err
    assert open(os.path.join(train_dir, "results.json")).read() == before
    out = tmp_path / "ft"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({
        "kind": "finetune", "network": {"checkpoint": "other", "checkpoint_hash": "0" * 16},
        "dataset": "digits@5-9", "test_accuracy": 0.5}))
    err = one_line_error(capsys, lambda: finetune.main([*argv, "--out", str(out)]))
    assert f"{out}/results.json holds the fine-tuning of another checkpoint or setting " \
           f"(checkpoint_hash: '{'0' * 16}' -> '{common.file_hash(source)}')" in err
    assert not (out / "grid").exists()                        # refused before any training

"""Tests of train_imagenet.py: the training machinery and the script (CPU, digits, tiny runs)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import common
import train_imagenet
from conftest import ROOT, non_finite_copy, one_line_error, read_only

# A tiny configuration: ResNet-18 with the small-input stem on 8 px digits, batch 32.
TINY = ["--data", "digits@0-4", "--arch", "resnet18", "--resolution", "8", "--batch-size", "32",
        "--epochs", "1", "--workers", "0", "--threads", "1", "--log-every", "1",
        "--eval-batch-size", "128"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny 8 px convolutions run fastest on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(tmp_path, name, *extra):
    out = str(tmp_path / name)
    return out, train_imagenet.main([*TINY, "--out", out, *extra])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def kill_at_step(step):
    """The environment of a run that SIGKILLs itself before step index `step` (its last.pt
    written): train_imagenet.read_test_hooks."""
    return {"KORNBLITH_TEST_HOOKS": f"kill_at_step={step}"}


def run_script(args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_imagenet.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Pieces of the machinery

def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    f = [train_imagenet.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[99] < 1e-3
    assert train_imagenet.lr_factor(100, 100, 10) == 0.0


def test_ema_averages_parameters_and_bn_buffers_and_copies_counters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = train_imagenet.ema_new(model)
    assert all(not p.requires_grad for p in ema.parameters())
    old_w, old_rm = ema[0].weight.clone(), ema[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.fill_(7)
    train_imagenet.ema_update(ema, model, decay=0.99, step=0)  # d = min(0.99, 1/10) = 0.1
    assert torch.allclose(ema[0].weight, 0.1 * old_w + 0.9 * model[0].weight)
    assert torch.allclose(ema[1].running_mean, 0.1 * old_rm + 0.9 * model[1].running_mean)
    assert int(ema[1].num_batches_tracked) == 7
    before = ema[0].weight.clone()
    train_imagenet.ema_update(ema, model, decay=0.5, step=1000)  # d = 0.5
    assert torch.allclose(ema[0].weight, 0.5 * before + 0.5 * model[0].weight)


def test_sampler_splits_each_epoch_across_ranks_and_resumes_mid_epoch():
    n, world, per_epoch = 23, 2, 10
    samplers = [train_imagenet.EpochSampler(n, per_epoch, r, world, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(4)
    keys = [list(s) for s in samplers]
    assert all(len(k) == per_epoch and all(e == 4 for e, _ in k) for k in keys)
    idx = [i for k in keys for _, i in k]
    assert len(set(idx)) == len(idx)  # ranks never share an image within an epoch
    again = train_imagenet.EpochSampler(n, per_epoch, 0, world, seed=3)
    again.set_epoch(4, start=6)
    assert list(again) == keys[0][6:] and len(again) == 4
    again.set_epoch(5)
    assert [i for _, i in again] != [i for _, i in keys[0]]


def test_augmentation_depends_only_on_seed_epoch_and_index():
    data = common.load_dataset("digits@0-4")
    tf = common.train_transform(8, "paper")  # random crops and flips: plenty of randomness
    ds = train_imagenet.SeededAugment(data["train"], tf, seed=0)
    torch.manual_seed(123)
    a = ds[(2, 5)][0]
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = ds[(2, 5)][0]
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    ds[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    others = [ds[(e, 5)][0] for e in range(3, 9)]
    assert any(not torch.equal(a, o) for o in others)


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    import random
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    st = train_imagenet.rng_states(torch.device("cpu"))
    want = (torch.rand(3), np.random.rand(3), random.random())
    path = str(tmp_path / "rng.pt")
    torch.save({"rng": [st]}, path)
    loaded = torch.load(path, weights_only=True)["rng"][0]
    train_imagenet.set_rng_states(loaded, torch.device("cpu"))
    assert torch.equal(torch.rand(3), want[0])
    assert np.array_equal(np.random.rand(3), want[1]) and random.random() == want[2]


def test_evaluation_shards_count_every_image_once():
    data = common.load_dataset("digits")  # val: 135 images, not divisible by 2 or 4
    torch.manual_seed(0)
    model = common.build_model("softmax", 10, "resnet18", small_input=True)
    whole = train_imagenet.evaluate({"m": model}, data["val"], 8)["m"]
    assert whole["count"] == len(data["val"]) == 135
    for world in (2, 4):
        parts = [data["val"].indices[r::world] for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(data["val"].indices.tolist())
    # the accuracies agree with common.accuracy of the same logits, all at once
    feats, labels = common.collect_features(model, common.eval_loader(data["val"], 8), ["logits"])
    ref = common.accuracy(common.class_counts(torch.from_numpy(feats["logits"]),
                                              torch.as_tensor(labels), 10))
    assert whole["top1"] == pytest.approx(ref["top1"])
    assert whole["top5"] == pytest.approx(ref["top5"])
    assert whole["mean_per_class"] == pytest.approx(ref["mean_per_class"])


# ---------------------------------------------------------------------------------------------
# The script

@pytest.mark.parametrize("objective", list(common.OBJECTIVES))
def test_every_objective_trains_and_writes_loadable_outputs(tmp_path, objective):
    out, results = train(tmp_path, objective, "--objective", objective)
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 18 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:3]), losses
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("epochs", "top1", "top5", "top1_raw", "top5_raw", "train_seconds",
                "images_per_second", "val_top1", "mean_per_class"):
        assert saved[key] is not None, key
    net = saved["network"]  # the identity block, first in the file
    assert list(saved)[:4] == ["kind", "network", "dataset", "dataset_name"]
    assert saved["kind"] == "train" and saved["dataset"] == "digits@0-4"
    assert net["objective"] == objective and net["dataset"] == "digits@0-4"
    assert net["hparams"] == common.objective_hparams(objective)
    assert net["seed"] == 0 and net["resolution"] == 8 and net["arch"] == "resnet18"
    assert net["checkpoint_hash"] == common.file_hash(os.path.join(out, "final.pt"))
    assert saved["test_count"] == len(common.load_dataset("digits@0-4")["test"])
    ck = common.load_checkpoint(os.path.join(out, "final.pt"))
    model = common.model_from_checkpoint(ck)
    assert ck["args"]["resolution"] == 8 and ck["args"]["seed"] == 0
    model2, network = common.load_pretrained(os.path.join(out, "final.pt"))
    assert network == net and len(net["run_id"]) == 32 and ck["run_id"] == net["run_id"]
    # final.pt holds the EMA weights that gave results.json's top1 on the test split
    data = common.load_dataset("digits@0-4")
    m = train_imagenet.evaluate({"ema": model}, data["test"], 8)["ema"]
    assert m["top1"] == pytest.approx(saved["top1"])
    with open(os.path.join(out, "summary.csv")) as f:
        assert f.readline().startswith("epoch,step,lr,train_loss")


def test_changed_arguments_are_refused_on_resume_unless_forced(tmp_path):
    out, first = train(tmp_path, "run", "--keep-resume-state")
    _, again = train(tmp_path, "run", "--keep-resume-state")  # evaluated again, not trained
    assert again["steps"] == 18 and again["top1"] == first["top1"]
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 19))
    with pytest.raises(common.UserError, match="epochs: 1 -> 2.*--force-resume"):
        train(tmp_path, "run", "--epochs", "2")
    with pytest.raises(common.UserError, match="objective"):
        train(tmp_path, "run", "--objective", "sigmoid")
    with pytest.raises(common.UserError, match="lr"):
        train(tmp_path, "run", "--lr", "0.5")
    _, results = train(tmp_path, "run", "--epochs", "2", "--force-resume")
    assert results["steps"] == 36 and results["epochs"] == 2


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    # step indices count from 0, log.jsonl's steps from 1: index 7 is step 8
    monkeypatch.setenv("KORNBLITH_TEST_HOOKS", "nan_at_step=7")
    with pytest.raises(common.UserError, match=r"nan/inf at step 8 .*last\.pt \(step 6\)"):
        train_imagenet.main([*TINY, "--out", out, "--log-every", "2", "--ckpt-minutes", "0"])
    ck = common.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["train_state"]["step"] == 6
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
    assert not os.path.exists(os.path.join(out, "final.pt"))


def test_progress_lines_with_eta_come_at_log_steps_within_an_epoch(tmp_path, capsys):
    train(tmp_path, "p", "--progress-seconds", "0", "--log-every", "4")
    lines = [l for l in capsys.readouterr().out.splitlines() if " eta " in l]
    # 18 steps per epoch: log steps 4, 8, 12, 16 within it; step 18 gets the epoch's own line
    assert [l.split(" | ")[0] for l in lines] == [
        f"epoch 1/1 step {s}/18 ({100 * s / 18:.0f}%)" for s in (4, 8, 12, 16)]
    for line in lines:
        assert __import__("re").fullmatch(r"[^|]+\| \d+ img/s \| loss \d+\.\d{4} \(epoch "
                                          r"\d+\.\d{4}\) \| lr \S+ \| eta epoch \d\S*, run "
                                          r"\d\S*", line), line
    # not a result: a finished run is read back whatever the interval (never refused)
    train(tmp_path, "p", "--progress-seconds", "5")
    assert "already finished" in capsys.readouterr().out
    train(tmp_path, "q")     # the default, 30 s: a run of a few seconds prints none
    assert " eta " not in capsys.readouterr().out


def test_kill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # dropout exercises the RNG restore; one loader worker exercises per-image seeding
    base = ["--data", "digits@0-4", "--objective", "dropout", "--batch-size", "64",
            "--resolution", "8", "--epochs", "2", "--workers", "1", "--log-every", "2",
            "--ckpt-minutes", "0", "--deterministic", "--threads", "1", "--keep-resume-state"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    try:  # the uninterrupted run in this process (one thread, as the scripts below)
        train_imagenet.main([*base, "--out", ref])
    finally:
        torch.use_deterministic_algorithms(False)
    r = run_script([*base, "--out", cut], kill_at_step(5))  # mid-epoch 1
    assert r.returncode == -9, r.stderr
    first = common.load_checkpoint(os.path.join(cut, "last.pt"))
    assert first["train_state"]["step"] == 4
    r = run_script([*base, "--out", cut], kill_at_step(13))  # mid-epoch 2
    assert r.returncode == -9 and "resumed at step 4" in r.stdout, r.stdout + r.stderr
    r = run_script([*base, "--out", cut])
    assert r.returncode == 0 and "resumed at step 12" in r.stdout, r.stdout + r.stderr
    a = torch.load(os.path.join(ref, "final.pt"), weights_only=True)
    b = torch.load(os.path.join(cut, "final.pt"), weights_only=True)
    last_a = torch.load(os.path.join(ref, "last.pt"), weights_only=True)  # kept: raw + EMA
    last_b = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    for x, y, part in ((a, b, "model"), (last_a, last_b, "model"), (last_a, last_b, "ema")):
        assert x[part].keys() == y[part].keys()
        for k in x[part]:
            assert torch.equal(x[part][k], y[part][k]), (part, k)
    assert a["weights"] == "ema" and a["ema"] is None  # final.pt: the EMA weights alone
    assert a["results"]["top1"] == b["results"]["top1"]
    assert a["run_id"] != b["run_id"] == first["run_id"]  # the resumed run kept its id
    assert b["run_id"] == json.load(open(os.path.join(cut, "results.json")))["network"]["run_id"]
    steps = [r["step"] for r in read_log(cut) if "loss" in r]
    assert steps == [r["step"] for r in read_log(ref)]  # no step logged twice or lost
    assert steps == [2, 4, 6, 8, 9, 10, 12, 14, 16, 18]  # every 2 steps and at epoch ends


def test_a_resume_that_flips_channels_last_trains_as_one_that_does_not(tmp_path):
    """The momentum buffers saved in last.pt keep the memory layout of the run that wrote them;
    fused SGD with a buffer whose layout differs from its parameter's computed wrong updates
    (max weight difference 0.055 after one step). Loaded state now takes each parameter's
    layout. Tolerance: channels_last and contiguous kernels round differently: 1.3e-4 (max
    over all weights and BN statistics) after these 8 steps; without the fix 6.3."""
    base = ["--data", "digits@0-4", "--batch-size", "64", "--resolution", "8", "--epochs", "2",
            "--workers", "0", "--log-every", "2", "--ckpt-minutes", "0", "--threads", "1",
            "--steps", "12"]
    finals = {}
    for name, flip in (("same", "--channels-last"), ("flipped", "--no-channels-last")):
        out = str(tmp_path / name)
        r = run_script([*base, "--out", out, "--channels-last"], kill_at_step(5))
        assert r.returncode == -9, r.stderr
        r = run_script([*base, "--out", out, flip])
        assert r.returncode == 0 and "resumed at step 4" in r.stdout, r.stdout + r.stderr
        finals[name] = torch.load(os.path.join(out, "final.pt"), weights_only=True)["model"]
    worst = max((finals["same"][k].float() - finals["flipped"][k].float()).abs().max().item()
                for k in finals["same"] if finals["same"][k].is_floating_point())
    assert worst < 1e-3, f"weights differ by {worst} after a resume that flipped channels_last"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_and_exits(tmp_path, signum):
    out = str(tmp_path / "sig")
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--epochs", "20",
           "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(log) and os.path.getsize(log) > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stdout + stderr
    step = common.load_checkpoint(os.path.join(out, "last.pt"))["train_state"]["step"]
    assert 1 <= step < 20 * 18 and f"saved {out}/last.pt at step {step}" in stdout
    assert not os.path.exists(os.path.join(out, "final.pt"))


def test_torchrun_two_processes_count_every_val_image_once(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_imagenet.py"), "--data", "digits", "--epochs", "1",
           "--resolution", "8", "--batch-size", "64", "--workers", "0", "--log-every", "4",
           "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    data = common.load_dataset("digits")
    assert len(data["val"]) % 2 == 1
    assert res["world_size"] == 2 and res["val_count"] == len(data["val"])
    assert res["test_count"] == len(data["test"])
    assert res["steps"] == (len(data["train"]) // 2) // 32
    assert "world 2, batch 32/device x 2 = 64 global" in r.stdout
    common.model_from_checkpoint(common.load_checkpoint(os.path.join(out, "final.pt")))


def jpeg_folder(root, per_class=(12, 4, 4)):
    """A 2-class image folder of real JPEG files (about 80 x 96 px) in tmp: the decode, crop and
    resize path of ImageNet-style data, without ../shared."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val", "test"), per_class):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                im = np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((16, 16, 1)))
                im = (255 - im if c == "b" else im).astype(np.uint8)
                Image.fromarray(im).save(os.path.join(root, split, c, f"{i}.jpg"), quality=85)
    return f"folder:{root}"


GPU_PATHS = ["--arch", "resnet18", "--resolution", "64", "--augment", "paper", "--batch-size",
             "8", "--epochs", "2", "--steps", "4", "--compile", "--precision", "bf16",
             "--channels-last", "--workers", "1", "--log-every", "1", "--ckpt-minutes", "0"]


def test_the_gpu_code_paths_run_through_the_real_loop_on_the_cpu(tmp_path):
    """torch.compile, bf16 autocast and channels_last together, on JPEG files with the paper's
    augmentation, one process: about a minute, most of it compiling."""
    data, out = jpeg_folder(str(tmp_path / "data")), str(tmp_path / "run")
    r = run_script(["--data", data, *GPU_PATHS, "--threads", "1", "--out", out], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bf16, compile True, channels_last True" in r.stdout
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["precision"] == "bf16" and res["compile"] is True and res["steps"] == 4
    assert math.isfinite(res["test_loss"])
    common.model_from_checkpoint(common.load_checkpoint(os.path.join(out, "final.pt")))


def test_the_gpu_code_paths_under_torchrun_with_two_processes(tmp_path):
    """The same under torchrun (gloo): DDP is compiled, not wrapped around a compiled model."""
    data, out = jpeg_folder(str(tmp_path / "data")), str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_imagenet.py"), "--data", data, *GPU_PATHS, "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world 2, batch 4/device x 2 = 8 global" in r.stdout
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["world_size"] == 2 and res["precision"] == "bf16" and res["compile"] is True
    assert res["test_count"] == 8 and math.isfinite(res["test_loss"])


def test_benchmarks_run_through_the_public_training_api(tmp_path, monkeypatch):
    # benchmarks/bench_train.py times the real loop from the outside: no benchmark code in it
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_train
    a = bench_train.main(["--loader", "--data-spec", "digits", "--batch-size", "16",
                          "--steps", "2", "--workers", "0", "--resolution", "8"])
    assert a > 0
    args = type("A", (), dict(arch="resnet18", small_input=True, batch_size=8, steps=2))
    assert bench_train.synthetic(args, "cpu", compile_model=False, resolution=8) > 0
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--steps", "6",
           "--log-every", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rate, wall = bench_train.training_rate(cmd, 2, 32)
    assert rate > 0 and wall > 0


def test_bad_inputs_give_one_line_errors(tmp_path):
    r = run_script(["--data", "digits@0-4", "--out", str(tmp_path / "x"), "--batch-size", "4096"])
    assert r.returncode == 2 and "larger than the training set" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    with pytest.raises(common.UserError, match="has no hyperparameter 'tau'"):
        train(tmp_path, "y", "--objective", "softmax", "--tau", "0.1")
    with pytest.raises(common.UserError, match="does not divide"):
        train(tmp_path, "z", "--micro-batch", "5")


# ---------------------------------------------------------------------------------------------
# Failures end the process (issue 13): loader workers ignore SIGTERM and SIGINT, so any way out
# of the loop must stop them, or the interpreter's exit waits for them forever.

def write_folder_with_a_corrupt_image(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(40):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    (root / "train" / "a" / "7.png").write_bytes(b"not a png")


def test_a_failure_in_a_loader_worker_ends_the_process(tmp_path):
    write_folder_with_a_corrupt_image(tmp_path / "f")
    # fails by timeout if the process does not exit (it hung forever before the fix)
    r = run_script(["--data", f"folder:{tmp_path / 'f'}", "--arch", "resnet18", "--resolution",
                    "8", "--batch-size", "8", "--epochs", "2", "--workers", "1", "--out",
                    str(tmp_path / "run")], timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot decode image"), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "7.png" in r.stderr


def test_ctrl_c_to_the_process_group_ends_training_and_its_workers(tmp_path):
    out = str(tmp_path / "int")
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--epochs", "50",
           "--workers", "1", "--ckpt-minutes", "0", "--out", out]
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and then so would training
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
    time.sleep(6)  # a worker notices a dead parent within 5 s; none may be left
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "processes left in the group"
    common.load_checkpoint(os.path.join(out, "last.pt"))  # intact


def checkpoint_write_held_until_released():
    """A CheckpointWriter whose write in flight holds until the test sets `go` (then takes 0.5 s
    more): a Ctrl-C from ctrl_c_soon() lands while the writer is busy, however slow the machine."""
    writer, written, go = train_imagenet.CheckpointWriter(), [], threading.Event()
    writer.start(lambda: (go.wait(30), time.sleep(0.5), written.append(1)))
    return writer, written, go


def ctrl_c_soon():
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()


def test_ctrl_c_while_waiting_for_a_checkpoint_write_still_waits_for_it():
    """Python 3.11's Thread.join(), interrupted by Ctrl-C, marks the still-running thread as
    finished (CPython gh-90882): the interpreter then exited under the last.pt writer and the
    process aborted in torch.save (SIGABRT, "terminate called without an active exception";
    6 of 48 Ctrl-Cs of the group test above). After the interrupt, close() must still wait."""
    writer, written, go = checkpoint_write_held_until_released()
    with pytest.raises(KeyboardInterrupt):
        ctrl_c_soon()
        writer.wait()
    go.set()
    writer.close()
    assert written == [1], "close() returned before the write in flight was done"


def test_ctrl_c_while_closing_the_checkpoint_writer_is_a_ctrl_c():
    """close() runs on every way out of the step loop, a normal end included: a Ctrl-C there
    must stop the run, not be printed as a failed write and dropped. The write goes on in its
    (non-daemon) thread, which the interpreter waits for at exit."""
    writer, written, go = checkpoint_write_held_until_released()
    with pytest.raises(KeyboardInterrupt):
        ctrl_c_soon()
        writer.close()
    go.set()
    writer.close()   # waits for the write in flight
    assert written == [1]


_FORK_SIGINT = {"armed": False}


def _sigint_while_forking():
    if _FORK_SIGINT["armed"]:
        _FORK_SIGINT["armed"] = False
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(after_in_parent=_sigint_while_forking)


def test_ctrl_c_while_the_loader_forks_its_workers_is_not_lost(tmp_path):
    """A Ctrl-C that arrives while a DataLoader forks its workers runs Python's handler inside an
    at-fork callback, where a KeyboardInterrupt is printed as "Exception ignored" and dropped:
    training went on (the CI run's hang of the group test above, 1 in 27 Ctrl-Cs by hand).
    Here the signal comes exactly then; it must still stop the run."""
    _FORK_SIGINT["armed"] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path, "forked", "--workers", "1", "--epochs", "3")
    finally:
        _FORK_SIGINT["armed"] = False
    assert not os.path.exists(os.path.join(tmp_path, "forked", "final.pt"))


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    out, _ = train(tmp_path, "full", "--epochs", "1", "--keep-resume-state")
    os.remove(os.path.join(out, "final.pt"))
    before = common.load_checkpoint(os.path.join(out, "last.pt"))["train_state"]["step"]
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the next last.pt is written
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(common.UserError, match=r"last\.pt: no space left on the device \(the "
                                               r"previous file is unchanged\)"):
        train_imagenet.main([*TINY, "--out", out, "--epochs", "2", "--force-resume"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert common.load_checkpoint(os.path.join(out, "last.pt"))["train_state"]["step"] == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no leftovers


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out, _ = train(tmp_path, "modes")
    finally:
        os.umask(old)
    for name in ("final.pt", "results.json", "args.json", "summary.csv"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o640, name


# ---------------------------------------------------------------------------------------------
# --evaluate: a checkpoint scored on the test split without training (issue 15)

def test_evaluate_scores_a_checkpoint_as_its_training_did(tmp_path):
    out, trained = train(tmp_path, "softmax_s0")
    with open(os.path.join(out, "results.json")) as f:
        trained = json.load(f)
    ev = str(tmp_path / "eval")
    flags = ["--evaluate", os.path.join(out, "final.pt"), "--data", "digits@0-4", "--out", ev,
             "--eval-batch-size", "128"]
    r = train_imagenet.main(flags)
    with open(os.path.join(ev, "results.json")) as f:
        saved = json.load(f)
    assert saved == r and list(saved)[:11] == [
        "kind", "network", "dataset", "dataset_name", "top1", "top5", "mean_per_class", "metric",
        "count", "resolution", "preprocessing"]
    assert saved["kind"] == "evaluate" and saved["network"] == trained["network"]
    # the same EMA weights, split and preprocessing as training's own test evaluation
    assert saved["top1"] == pytest.approx(trained["top1"])
    assert saved["mean_per_class"] == pytest.approx(trained["mean_per_class"])
    assert (saved["count"], saved["resolution"], saved["preprocessing"]) == \
        (trained["test_count"], 8, "torchvision")
    with pytest.raises(common.UserError, match="preprocessing: 'torchvision' -> 'tf'"):
        train_imagenet.main([*flags, "--eval-preprocessing", "tf"])   # another computation
    tf = train_imagenet.main([*flags, "--eval-preprocessing", "tf", "--overwrite"])
    assert tf["preprocessing"] == "tf" and tf["count"] == saved["count"]
    assert 0 < tf["top1"] <= 1
    with pytest.raises(common.UserError, match="has 5 outputs but digits has 10 classes"):
        train_imagenet.main([*flags[:3], "digits", "--out", ev])
    with pytest.raises(common.UserError, match="results of another kind"):
        train_imagenet.main([*flags[:5], out])     # never over a training run's results.json


def test_evaluate_bad_inputs_give_one_line_errors(tmp_path):
    missing = str(tmp_path / "nope.pt")
    for args, message in (
            (["--evaluate", missing, "--data", "digits", "--out", str(tmp_path / "e")],
             f"error: checkpoint not found: {missing}"),
            (["--evaluate", missing, "--data", "digits"], "--out"),
            (["--evaluate", missing, "--data", "digits", "--out", str(tmp_path / "e"),
              "--eval-preprocessing", "pil"], "invalid choice: 'pil'")):
        r = run_script(args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0 and r.stdout == ""


def test_flags_evaluate_does_not_use_are_refused(capsys):
    """--evaluate scores a trained network: a training flag with it, or --eval-preprocessing
    without it, would be ignored, so each is one line (issue 27)."""
    base = ["--evaluate", "x.pt", "--data", "digits", "--out", "o"]
    for extra, flag in ((["--epochs", "3"], "--epochs"), (["--no-nesterov"], "--no-nesterov"),
                        (["--tau", "0.1"], "--tau"), (["--seed", "1"], "--seed")):
        err = one_line_error(capsys, lambda: train_imagenet.parse_args([*base, *extra]))
        assert f"error: {flag} is not used with --evaluate" in err
    err = one_line_error(capsys, lambda: train_imagenet.parse_args(
        ["--data", "digits", "--out", "o", "--eval-preprocessing", "tf"]))
    assert "--eval-preprocessing is not used in training (it goes with --evaluate)" in err
    # what --evaluate reads, and a training flag at its default value, pass
    args = train_imagenet.parse_args([*base, "--eval-preprocessing", "tf", "--workers", "0",
                                      "--eval-batch-size", "8", "--resolution", "16",
                                      "--momentum", "0.9"])
    assert args.eval_preprocessing == "tf" and args.workers == 0


@pytest.mark.parametrize("flags, message", [
    (["--eval-batch-size", "0"], "must be > 0"), (["--momentum", "-1"], r"in \[0, 1\)"),
    (["--warmup-epochs", "inf"], "not a finite number"), (["--seed", str(2 ** 64)], "2\\*\\*63"),
    (["--weight-decay", "-1"], "must be >= 0"), (["--ckpt-minutes", "nan"], "finite"),
    (["--resolution", "0"], r"in \[1, 4096\]"), (["--resolution", "100000"], r"in \[1, 4096\]"),
    (["--log-every", "0"], "must be > 0"),
    (["--workers", "-1"], "must be >= 0"), (["--lr", "-0.1"], "must be > 0"),
    (["--workers", "1000"], r"'1000' is more than the \d+ CPU cores this process may use"),
    (["--threads", "1000000"], r"'1000000' is more than the \d+ CPU cores"),
    (["--threads", "0"], "must be >= 1"),
    (["--objective", "dropout", "--dropout", "1.5"], r"dropout must be in \[0, 1\)"),
    (["--objective", "label_smoothing", "--alpha", "2"], r"alpha must be in \[0, 1\)"),
    (["--data", "digits@"], "empty class subset"),
])
def test_every_number_is_checked_before_any_work(tmp_path, capsys, flags, message):
    argv = [*TINY, "--out", str(tmp_path / "r"), *flags]
    with pytest.raises((SystemExit, common.UserError)) as e:
        common.run_main(lambda: train_imagenet.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err
    assert not os.path.exists(tmp_path / "r" / "log.jsonl")  # refused before training


@pytest.mark.parametrize("flags, changed", [
    (["--augment", "paper"], "augment: 'small' -> 'paper'"), (["--flip"], "flip: False -> True"),
    (["--precision", "bf16"], "precision: 'fp32' -> 'bf16'"),
    (["--micro-batch", "16"], "micro_batch: None -> 16"),
    (["--weight-decay", "1e-3"], "weight_decay: 8e-05 -> 0.001"),
])
def test_every_argument_that_changes_the_result_is_compared_on_resume(tmp_path, flags, changed):
    out, _ = train(tmp_path, "r", "--keep-resume-state")
    with pytest.raises(common.UserError, match=__import__("re").escape(changed)):
        train(tmp_path, "r", *flags)
    _, forced = train(tmp_path, "r", *flags, "--force-resume")  # forced: recorded in args.json
    saved = json.load(open(os.path.join(out, "args.json")))
    assert saved["forced_changes"][-1]["step"] == 18 and saved["forced_changes"][-1]["changed"]


def test_the_stem_cannot_change_even_when_forced(tmp_path):
    train(tmp_path, "s", "--keep-resume-state")
    with pytest.raises(common.UserError, match="small_input: False -> True.*do not fit"):
        train(tmp_path, "s", "--small-input", "--force-resume")


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    out = str(tmp_path / "busy")
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--epochs", "50",
           "--out", out]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "log.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        r = run_script([*TINY, "--seed", "1", "--out", out])
        assert r.returncode == 2 and f"is in use by pid {first.pid}" in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0
    finally:
        first.kill()
        first.communicate()


def test_a_run_killed_by_sigkill_reruns_at_once_and_resumes(tmp_path):
    """A preempted job is requeued at once. The killed run's loader worker outlives it for up to
    5 s; with a flock the worker kept the folder busy and the rerun was refused (issue 25)."""
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--epochs", "4",
           "--workers", "1", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:   # not a pipe: the workers keep it open
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env=env)
    workers = []
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "last.pt")) and time.time() < deadline:
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True,
                                 text=True).stdout.split()
        for pid in workers:  # kept alive past any timing of the rerun: the worst case, always
            os.kill(int(pid), signal.SIGSTOP)
        first.kill()
        first.wait()
        killed = time.time()
        again = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        assert time.time() - killed < 0.5
        stdout, stderr = again.communicate(timeout=300)
    finally:
        first.kill()
        for pid in workers:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert workers, "the run had no loader worker: the case is not exercised"
    assert again.returncode == 0 and "resumed at step" in stdout, stdout + stderr
    assert json.load(open(os.path.join(out, "results.json")))["steps"] == 4 * 18



def test_a_finished_run_keeps_only_its_final_weights_and_is_read_back(tmp_path):
    out, first = train(tmp_path, "done")
    assert not os.path.exists(os.path.join(out, "last.pt"))  # resume state dropped
    ck = common.load_checkpoint(os.path.join(out, "final.pt"))
    assert ck["weights"] == "ema" and ck["ema"] is None
    _, again = train(tmp_path, "done")  # read back, not trained again
    assert again == json.load(open(os.path.join(out, "results.json")))
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 19))
    with pytest.raises(common.UserError, match="epochs: 1 -> 2.*--keep-resume-state"):
        train(tmp_path, "done", "--epochs", "2", "--force-resume")



def test_a_damaged_log_and_an_unknown_device(tmp_path):
    out, _ = train(tmp_path, "log", "--keep-resume-state")
    with open(os.path.join(out, "log.jsonl"), "ab") as f:
        f.write(os.urandom(300))  # random bytes, as a crash of the file system might leave
    _, again = train(tmp_path, "log", "--keep-resume-state")  # resumes (re-evaluates) anyway
    assert again["steps"] == 18
    with pytest.raises(common.UserError, match="unknown device 'foo'"):
        train(tmp_path, "dev", "--device", "foo")


def test_nan_weights_in_a_checkpoint_name_the_checkpoint_not_the_lr(tmp_path, capsys):
    out, _ = train(tmp_path, "r", "--keep-resume-state")
    nan = non_finite_copy(os.path.join(out, "final.pt"), tmp_path / "nan.pt", "fc.bias")
    err = one_line_error(capsys, lambda: train_imagenet.main([
        "--evaluate", nan, "--data", "digits@0-4", "--out", str(tmp_path / "e")]))
    assert "nan.pt holds non-finite weights (model tensor fc.bias has NaN)" in err
    last = os.path.join(out, "last.pt")   # e.g. written by a signal after the loss went nan
    non_finite_copy(last, last, "layer1.0.bn1.weight", part="ema")
    err = one_line_error(capsys, lambda: train_imagenet.main([*TINY, "--out", out, "--epochs",
                                                              "2", "--force-resume"]))
    assert "last.pt holds non-finite weights (ema tensor layer1.0.bn1.weight has NaN)" in err
    assert "move it away to start the run afresh" in err and "lower --lr" not in err


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    err = one_line_error(capsys, lambda: train_imagenet.main([*TINY, "--out",
                                                              str(tmp_path / "afile" / "sub")]))
    assert f"output folder {tmp_path}/afile/sub cannot be created: {tmp_path}/afile is a file, " \
           f"not a folder" in err
    read_only(monkeypatch, tmp_path / "ro")
    err = one_line_error(capsys, lambda: train_imagenet.main([*TINY, "--out",
                                                              str(tmp_path / "ro" / "o")]))
    assert "cannot write into" in err and "Read-only file system" in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_the_eval_loader_is_built_once_and_its_workers_persist(tmp_path, monkeypatch):
    """Every epoch end used to build a new eval DataLoader and fork its workers on every rank."""
    built = []
    real = train_imagenet.rank_loader
    monkeypatch.setattr(train_imagenet, "rank_loader",
                        lambda *a, **k: built.append(a[0]) or real(*a, **k))
    data = jpeg_folder(str(tmp_path / "data"), per_class=(8, 4, 4))
    train_imagenet.main(["--data", data, "--arch", "resnet18", "--resolution", "32",
                         "--batch-size", "8", "--epochs", "3", "--workers", "1",
                         "--out", str(tmp_path / "run")])
    assert len(built) == 2          # val (3 epoch ends) and test (once)


def _decide_on_a_node_local_disk(rank, init, outs, results):
    """One rank of a 2-process gloo group whose --out is a different folder on each rank."""
    import types
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    run = types.SimpleNamespace(dist=train_imagenet.Dist(rank, 2, rank, torch.device("cpu")),
                                path=lambda name: os.path.join(outs[rank], name))
    try:
        results[rank] = train_imagenet.shared_decision(run)
    except common.UserError as e:
        results[rank] = f"error: {e}"
    finally:
        torch.distributed.destroy_process_group()


def test_rank_0_decides_whether_to_resume_and_a_rank_that_cannot_see_last_pt_stops(tmp_path):
    import torch.multiprocessing as mp
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for o in outs:
        os.makedirs(o)
    open(os.path.join(outs[0], "last.pt"), "w").close()   # only node 0's disk has it
    for case in ("local disks", "shared"):
        if case == "shared":
            open(os.path.join(outs[1], "last.pt"), "w").close()
        results = mp.Manager().dict()
        init = f"file://{tmp_path}/pg_{case.replace(' ', '_')}"
        mp.spawn(_decide_on_a_node_local_disk, args=(init, outs, results), nprocs=2)
        if case == "local disks":
            assert all("every node shares" in results[r] for r in (0, 1)), dict(results)
        else:
            assert dict(results) == {0: "resume", 1: "resume"}


def test_a_small_dev_shm_is_one_line_not_a_bus_error(tmp_path, monkeypatch, capsys):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(train_imagenet.shutil, "disk_usage", lambda p: usage(2**26, 0, 2**26))
    with pytest.raises(common.UserError, match=r"--ipc=host or --shm-size=4g"):
        train_imagenet.check_shared_memory(8, 512, 224)         # 2.3 GiB in 64 MiB
    train_imagenet.check_shared_memory(1, 128, 32)               # the CPU study: 1.5 MB
    train_imagenet.check_shared_memory(0, 4096, 224)             # no workers, no shared memory


def test_the_prepared_gpu_check_runs_its_code_paths_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: every measurement of the GPU check, tiny, on the CPU, so
    that the one prepared GPU run does not fail on a code path no test ran."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--smoke",
                        "--jpeg", str(tmp_path / "none"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(out))
    assert res["resume"]["ok"] and res["real_loop_images_per_second"] > 0
    assert res["model_step_images_per_second"] > 0 and res["input_pipeline_images_per_second"] > 0


def small_checkpoint(path, seed):
    """A 5-class digits@0-4 network without training (evaluations only compare files)."""
    torch.manual_seed(seed)
    model = common.build_model("softmax", 5, arch="resnet18", small_input=True)
    common.save_checkpoint(str(path), common.make_checkpoint(
        model, {"objective": "softmax", "hparams": {}, "arch": "resnet18", "num_classes": 5,
                "small_input": True}, args={"resolution": 8, "seed": seed}, run_id=f"r{seed}",
        dataset="digits@0-4"))
    return str(path)


def test_two_evaluations_of_different_checkpoints_do_not_share_a_folder(tmp_path, capsys):
    a, b = small_checkpoint(tmp_path / "a.pt", 0), small_checkpoint(tmp_path / "b.pt", 1)
    out = str(tmp_path / "eval")
    flags = ["--data", "digits@0-4", "--out", out, "--eval-batch-size", "128"]
    train_imagenet.main(["--evaluate", a, *flags])
    train_imagenet.main(["--evaluate", a, *flags])       # the same one again: its own file
    err = one_line_error(capsys, lambda: train_imagenet.main(["--evaluate", b, *flags]))
    assert f"{out}/results.json holds the evaluation of another checkpoint or setting " \
           f"(checkpoint_hash: '{common.file_hash(a)}' -> '{common.file_hash(b)}')" in err
    assert json.load(open(os.path.join(out, "results.json")))["network"]["checkpoint"] == "a"
    train_imagenet.main(["--evaluate", b, *flags, "--overwrite"])
    assert json.load(open(os.path.join(out, "results.json")))["network"]["checkpoint"] == "b"


def test_training_and_fine_tuning_do_not_share_a_folder(tmp_path, capsys):
    """Training into a finished fine-tune's folder replaced its results.json (issue 25)."""
    ft = tmp_path / "ft"
    (ft / "grid").mkdir(parents=True)
    (ft / "results.json").write_text(json.dumps({"kind": "finetune", "test_accuracy": 0.9}))
    err = one_line_error(capsys, lambda: train(tmp_path, "ft"))
    assert "ft holds results of another kind (fine-tuning: results.json of kind finetune); " \
           "training results need a folder of their own" in err and "--overwrite" in err
    assert json.loads((ft / "results.json").read_text())["kind"] == "finetune"   # untouched
    assert sorted(os.listdir(ft)) == [".lock", "grid", "results.json"]   # nothing written
    _, r = train(tmp_path, "ft", "--overwrite")                   # asked for: written
    assert r["steps"] == 18 and json.loads((ft / "results.json").read_text())["kind"] == "train"
    assert "overwrite" not in json.loads((ft / "args.json").read_text())  # not a run argument


def test_a_full_disk_while_logging_is_one_line_and_leaves_no_empty_log(tmp_path, monkeypatch):
    import errno

    class Full:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            self.f.close()

        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_imagenet, "open", Full, raising=False)
    log = str(tmp_path / "log.jsonl")
    with pytest.raises(common.UserError, match="log.jsonl: no space left on the device"):
        train_imagenet.append_log(log, {"step": 1})
    assert not os.path.exists(log)                   # not a 0-byte file
    open(log, "w").write('{"step": 1}\n')
    with pytest.raises(common.UserError, match="no space left"):
        train_imagenet.append_log(log, {"step": 2})
    assert open(log).read() == '{"step": 1}\n'       # the lines before are kept


def test_evaluating_on_other_classes_of_the_same_count_is_noted(tmp_path, capsys):
    a = small_checkpoint(tmp_path / "a.pt", 0)
    flags = ["--evaluate", a, "--out", str(tmp_path / "e"), "--eval-batch-size", "128"]
    train_imagenet.main([*flags, "--data", "digits@5-9"])
    err = capsys.readouterr().err
    assert f"note: {a} was trained on digits@0-4, and digits@5-9 has other classes (as many: " \
           f"5)" in err and err.count("\n") == 1
    train_imagenet.main([*flags[:3], str(tmp_path / "f"), "--data", "digits@0-4,per_class=50"])
    assert "note" not in capsys.readouterr().err      # the same classes, fewer images


def _started(cmd, out=None):
    """A script started as from a terminal (SIGINT at its default, not inherited ignored)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_while_the_script_imports_torch_is_one_line(tmp_path):
    """Ctrl-C in the first 1-2 s, while torch loads, printed Python's traceback (issue 25)."""
    proc = _started([sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--out",
                     str(tmp_path / "r")])
    deadline = time.time() + 60
    while time.time() < deadline:   # numpy being loaded: torch is next, for 1-2 s
        with open(f"/proc/{proc.pid}/maps") as f:
            if "numpy" in f.read():
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.startswith("error: interrupted (Ctrl-C)"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_a_killed_loader_worker_is_one_line(tmp_path):
    """A worker killed during training (the OOM killer, kill -9) was a traceback (issue 25)."""
    out = str(tmp_path / "w")
    proc = _started([sys.executable, os.path.join(ROOT, "train_imagenet.py"), *TINY, "--epochs",
                     "50", "--workers", "1", "--out", out])
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "last.pt")) and time.time() < deadline:
        time.sleep(0.1)
    worker = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                            text=True).stdout.split()[0]
    os.kill(int(worker), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.count("\n") == 1, stderr[-2000:]
    # Which error the main process sees depends on where the kill lands: torch's "DataLoader
    # worker (pid N) is killed" or "(pid(s) N) exited unexpectedly", or a reset connection when
    # the worker held a batch's shared memory (common.worker_died; all three seen under load).
    # Each must read the same way.
    died = re.escape("error: a data-loading worker process died (")
    assert re.match(rf"{died}(DataLoader worker \(pid(\(s\))? {worker}\)"
                    rf"|\[Errno 104\] Connection reset|EOFError\))", stderr), stderr
    assert "rerun the same command to resume" in stderr
    common.load_checkpoint(os.path.join(out, "last.pt"))   # intact: the rerun resumes from it

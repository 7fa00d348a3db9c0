"""import_tf_checkpoint.py: the TF checkpoint reader, the ResNet-50 mapping and its exactness
against TensorFlow's own outputs, TF's eval preprocessing, and the one-line errors.

No TensorFlow here: tests/fixtures/ holds what TF wrote (see tests/fixtures/make_tf_fixtures.py,
which also gives the seeded recipe of the synthetic ResNet-50 weights), and write_bundle() below
writes TF's format for the cases TF was not run for."""
import base64
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import class_separation
import common
import import_tf_checkpoint as itc
from conftest import ROOT, one_line_error

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
_spec = importlib.util.spec_from_file_location("make_tf_fixtures",
                                               os.path.join(FIX, "make_tf_fixtures.py"))
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
EMA = "/ExponentialMovingAverage"
NP_TO_TF = {"<f4": 1, "<f8": 2, "<i4": 3, "|u1": 4, "<i8": 9, "|b1": 10, "<f2": 19}


# ----------------------------------------------------------------------------------------------
# A test-only writer of TF's bundle format (one data block, no prefix compression)

def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number, value):
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _table_block(items):
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in items)
    body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")      # one restart at 0
    return body


def _with_trailer(block, kind=0):
    raw = block + bytes([kind])
    return raw + itc.masked_crc32c(raw).to_bytes(4, "little")


def write_bundle(prefix, tensors, crc=True, sliced=(), dtype_override=None, block_kind=0):
    """Write {name: array} as PREFIX.index + PREFIX.data-00000-of-00001 like TF's Saver."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    items, offset = [(b"", _field(1, 1) + _field(3, _field(1, 1)))], 0    # num_shards, version
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        for name in sorted(tensors):
            a = np.asarray(tensors[name], order="C")
            raw = a.tobytes()
            f.write(raw)
            shape = b"".join(_field(2, _field(1, d)) for d in a.shape)
            dtype = (dtype_override or {}).get(name, NP_TO_TF[a.dtype.str])
            e = _field(1, dtype) + _field(2, shape) + _field(4, offset) + _field(5, len(raw))
            if crc:
                e += bytes([6 << 3 | 5]) + itc.masked_crc32c(raw).to_bytes(4, "little")
            if name in sliced:
                e += _field(7, b"")
            items.append((name.encode(), e))
            offset += len(raw)
    data_block = _with_trailer(_table_block(items), block_kind)
    meta_block = _with_trailer(_table_block([]))
    handle = _varint(0) + _varint(len(data_block) - 5)
    index_block = _with_trailer(_table_block([(items[-1][0], handle)]))
    meta_off, index_off = len(data_block), len(data_block) + len(meta_block)
    footer = (_varint(meta_off) + _varint(len(meta_block) - 5) + _varint(index_off)
              + _varint(len(index_block) - 5)).ljust(40, b"\0")
    footer += itc.TABLE_MAGIC.to_bytes(8, "little")
    with open(prefix + ".index", "wb") as f:
        f.write(data_block + meta_block + index_block + footer)


def names_shapes(head):
    with open(os.path.join(FIX, "resnet50_names.json")) as f:
        return json.load(f)[head]


@pytest.fixture(scope="module")
def tf_tree(tmp_path_factory):
    """The released layout with the fixture's two synthetic ResNet-50s (linear head as softmax,
    cosine head as cosine_softmax), EMA shadows as TF's eval restores them, plus raw weights
    and momentum slots (dummies: the importer must never read them)."""
    root = tmp_path_factory.mktemp("bucket")
    for head, objective in gen.HEADS.items():
        ns = names_shapes(head)
        tensors = {n + EMA: v for n, v in gen.synthetic_weights(ns, 0).items()}
        tensors.update({n: np.float32(1) for n, _ in ns})
        tensors.update({n + "/Momentum": np.zeros(2, np.float32) for n, _ in ns})
        tensors["global_step"] = np.int64(112590)
        write_bundle(str(root / objective / "seed3" / "model.ckpt"), tensors)
    return root


scripts_outputs, rel_err = gen.scripts_outputs, gen.rel_err


# ----------------------------------------------------------------------------------------------
# Reader

def test_reads_tf_written_checkpoint_of_every_dtype():
    entries, shards = itc.read_index(os.path.join(FIX, "tiny.ckpt"))
    expected = dict(np.load(os.path.join(FIX, "tiny_expected.npz")))
    assert shards == 1 and set(entries) == set(expected) | {"bf16", "text"}
    got = itc.read_tensors(os.path.join(FIX, "tiny.ckpt"), list(expected), entries)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want)
    for name, kind in (("bf16", "bfloat16"), ("text", "string")):
        with pytest.raises(common.UserError, match=f"tensor {name} has dtype {kind}"):
            itc.read_tensors(os.path.join(FIX, "tiny.ckpt"), [name], entries)


def test_crc32c():
    assert itc.crc32c(b"123456789") == 0xE3069283            # the CRC-32C check value
    assert itc.crc32c(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8).tobytes()
    assert itc.crc32c(data) == itc._crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF   # lanes == bytes
    assert itc.masked_crc32c(b"") == 0xA282EAD8


def test_writer_round_trip(tmp_path):
    values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5)}
    write_bundle(str(tmp_path / "m.ckpt"), values)
    entries, _ = itc.read_index(str(tmp_path / "m.ckpt"))
    got = itc.read_tensors(str(tmp_path / "m.ckpt"), ["w", "s"], entries)
    np.testing.assert_array_equal(got["w"], values["w"])
    assert got["s"].shape == () and got["s"] == 2.5


# ----------------------------------------------------------------------------------------------
# The ResNet-50 mapping and exactness against TF

@pytest.mark.parametrize("head", ["dense", "cosine"])
def test_name_map_is_tf_graph(head):
    """The names TF's own graph gave its variables are exactly the mapped ones, and every shape
    fits torchvision's ResNet-50 after the layout change."""
    ns = dict((n, s) for n, s in names_shapes(head))
    mapping = itc.tf_name_map(cosine=head == "cosine")
    assert sorted(mapping.values()) == sorted(ns)
    state = common.build_model("softmax", 1001, "resnet50").state_dict()
    for key, name in mapping.items():
        shape = ns[name]
        shape = [shape[3], shape[2], shape[0], shape[1]] if len(shape) == 4 else shape[::-1]
        assert list(state[key].shape) == shape, (key, name)
    assert mapping["layer1.0.downsample.0.weight"] == "conv2d_1/kernel"
    assert mapping["layer1.0.conv1.weight"] == "conv2d_2/kernel"
    assert mapping["layer4.2.bn3.running_var"] == "batch_normalization_52/moving_variance"


def test_resnet50_reproduces_tf_outputs(tf_tree, tmp_path, capsys):
    """Folder mode converts the tree; each model, loaded as the scripts load it, gives TF's 16
    block outputs, pooled features and final layer to float32 round-off."""
    out = tmp_path / "pt"
    itc.main(["--checkpoint", str(tf_tree), "--out", str(out)])
    assert sorted(os.listdir(out)) == ["cosine_softmax_s3.pt", "softmax_s3.pt"]
    ref = dict(np.load(os.path.join(FIX, "resnet50_outputs.npz")))
    for head, objective in gen.HEADS.items():
        model, info = common.load_pretrained(str(out / f"{objective}_s3.pt"))  # info: identity
        assert (info["objective"], info["seed"], info["resolution"], model.fc.out_features) == \
            (objective, 3, 224, 1000)
        assert (info["dataset"], info["dataset_name"]) == ("imagenet", "imagenet")
        # a stable run id (the bucket path's uuid5): results of imported networks join by it
        assert info["run_id"] == itc.released_run_id(objective, 3, "anywhere") == \
            common.load_checkpoint(str(out / f"{objective}_s3.pt"))["run_id"]
        assert isinstance(model.maxpool, common.MaxPoolSame) and info["stem_pool"] == "tf_same"
        for key, batch in gen.BATCHES.items():
            got = scripts_outputs(model, gen.images(batch))
            errs = {"pool": rel_err(got["pool"], ref[f"{key}_pool"]),
                    "logits": rel_err(got["logits"], ref[f"{head}_{key}_logits"][:, 1:])}
            for i in range(1, 17):
                maps = ref[f"{key}_block{i}_maps"]
                g = got[f"block{i}"].view(len(maps), -1, *maps.shape[2:])
                errs[f"block{i}"] = max(rel_err(g.mean((2, 3)), ref[f"{key}_block{i}_mean"]),
                                        rel_err(g[:, [0, -1]], maps))
            assert max(errs.values()) < 1e-4, (objective, key, errs)


def test_keep_background_and_checkpoint_record(tf_tree, tmp_path):
    prefix = str(tf_tree / "cosine_softmax" / "seed3" / "model.ckpt")
    out = str(tmp_path / "c.pt")
    itc.main(["--checkpoint", prefix, "--out", out, "--keep-background"])
    ck = common.load_checkpoint(out)
    assert ck["num_classes"] == 1001 and ck["stem_pool"] == "tf_same"
    assert ck["hparams"] == {"tau": 0.05, "normalize_features": False}
    assert ck["tf_checkpoint"]["background_class_kept"] and ck["dataset"] == "imagenet"
    model = common.model_from_checkpoint(ck)
    ref = np.load(os.path.join(FIX, "resnet50_outputs.npz"))["cosine_a_logits"]
    got = scripts_outputs(model, gen.images(gen.BATCHES["a"]))["logits"]
    assert rel_err(got, ref) < 1e-4


def test_stem_pool_is_tf_same_and_old_checkpoints_keep_torchvision():
    """TF SAME pads 0 before / 1 after an even side, 1 / 1 an odd one (out = ceil(side / 2))."""
    def pads(n):
        return (0, 1) if n % 2 == 0 else (1, 1)
    for h, w in ((6, 7), (7, 6), (112, 112), (5, 5)):
        x = torch.randn(1, 2, h, w)
        ref = torch.nn.functional.max_pool2d(
            torch.nn.functional.pad(x, (*pads(w), *pads(h)), value=-float("inf")), 3, 2)
        got = common.MaxPoolSame()(x)
        assert got.shape[-2:] == ((h + 1) // 2, (w + 1) // 2) and torch.equal(got, ref)
    model = common.build_model("softmax", 5, arch="resnet18")
    ck = common.make_checkpoint(model, {"objective": "softmax", "hparams": {}, "arch": "resnet18",
                                        "num_classes": 5, "small_input": False})
    del ck["stem_pool"]  # a checkpoint from before stem_pool existed
    assert isinstance(common.model_from_checkpoint(ck).maxpool, torch.nn.MaxPool2d)
    with pytest.raises(common.UserError, match="stem_pool"):
        common.build_model("softmax", 5, arch="resnet18", stem_pool="same")


def test_tf_eval_transform_matches_tf_resize_bicubic():
    ref = np.load(os.path.join(FIX, "resize_expected.npz"))
    for i, (img, side) in enumerate(gen.resize_cases()):
        got = itc.tf_eval_transform(side)(torch.from_numpy(img).permute(2, 0, 1))
        want = torch.from_numpy(ref[f"case{i}"]).permute(2, 0, 1)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-3, i        # of 255


# ----------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors

def dummy_resnet(prefix, head="dense", drop=(), **kw):
    """A cheap bundle with every EMA name of the ResNet-50 but 1-element tensors (except the
    1001-class dense/bias)."""
    tensors = {n + EMA: np.zeros(1001 if n == "dense/bias" else 1, np.float32)
               for n, _ in names_shapes(head) if n not in drop}
    write_bundle(prefix, tensors, **kw)
    return prefix


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: itc.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_files(tmp_path, capsys):
    err = run_cli(["--checkpoint", str(tmp_path / "softmax/seed0/model.ckpt"), "--out",
                   str(tmp_path / "x.pt")], capsys)
    assert "model.ckpt.index not found" in err
    prefix = dummy_resnet(str(tmp_path / "softmax/seed0/model.ckpt"))
    os.remove(prefix + ".data-00000-of-00001")
    err = run_cli(["--checkpoint", prefix, "--out", str(tmp_path / "x.pt")], capsys)
    assert "data file" in err and "not found" in err
    # argparse's own errors are one line too (common.argument_parser)
    assert "--seed: '-1' must be in [0, 2**63)" in run_cli(
        ["--checkpoint", prefix, "--out", "x.pt", "--seed", "-1"], capsys)
    assert "required: --out" in run_cli(["--checkpoint", prefix], capsys)
    assert not os.path.exists(tmp_path / "x.pt")


def test_truncated_or_corrupt_data(tmp_path):
    prefix = str(tmp_path / "m.ckpt")
    write_bundle(prefix, {"a": np.arange(100, dtype=np.float32), "b": np.ones(3, np.float32)})
    entries, _ = itc.read_index(prefix)
    data = prefix + ".data-00000-of-00001"
    raw = bytearray(open(data, "rb").read())
    raw[17] ^= 1
    open(data, "wb").write(raw)
    with pytest.raises(common.UserError, match="corrupt .crc32c mismatch in tensor a"):
        itc.read_tensors(prefix, ["a"], entries)
    open(data, "wb").write(raw[:300])
    with pytest.raises(common.UserError, match="truncated .tensor b"):
        itc.read_tensors(prefix, ["b"], entries)
    index = bytearray(open(prefix + ".index", "rb").read())
    open(prefix + ".index", "wb").write(index[:-3])
    with pytest.raises(common.UserError, match="not a TensorFlow checkpoint index"):
        itc.read_index(prefix)
    index[20] ^= 0xFF
    open(prefix + ".index", "wb").write(index)
    with pytest.raises(common.UserError, match="corrupt .crc32c mismatch in a table block"):
        itc.read_index(prefix)


def test_missing_tensors_are_named(tmp_path):
    drop = ["conv2d_7/kernel", "batch_normalization_7/gamma", "dense/bias", "conv2d_9/kernel"]
    prefix = dummy_resnet(str(tmp_path / "softmax/seed1/model.ckpt"), drop=drop)
    with pytest.raises(common.UserError, match=r"tensor\(s\) .*conv2d_7/kernel/Exponential"
                                               r"MovingAverage.* and 1 more not in"):
        itc.convert(prefix)


def test_unsupported_entries(tmp_path):
    prefix = str(tmp_path / "m.ckpt")
    values = {"a": np.ones(2, np.float32), "c": np.ones(2, np.float32)}
    write_bundle(prefix, values, sliced={"a"}, dtype_override={"c": 8})
    entries, _ = itc.read_index(prefix)
    with pytest.raises(common.UserError, match="tensor a is stored in slices"):
        itc.read_tensors(prefix, ["a"], entries)
    with pytest.raises(common.UserError, match="tensor c has dtype complex64"):
        itc.read_tensors(prefix, ["c"], entries)
    write_bundle(prefix, values, block_kind=1)     # 1 = snappy, with a valid crc
    with pytest.raises(common.UserError, match="compressed table blocks"):
        itc.read_index(prefix)


def test_not_a_resnet50(tmp_path):
    prefix = dummy_resnet(str(tmp_path / "softmax/seed0/model.ckpt"))
    with pytest.raises(common.UserError, match="conv2d/kernel has shape .1., which does not fit "
                                               "a ResNet-50"):
        itc.convert(prefix)


def test_head_and_objective_must_agree(tmp_path, capsys):
    cos = dummy_resnet(str(tmp_path / "sigmoid/seed0/model.ckpt"), head="cosine")
    err = run_cli(["--checkpoint", cos, "--out", str(tmp_path / "x.pt")], capsys)
    assert "cosine head" in err and "objective is sigmoid" in err
    lin = dummy_resnet(str(tmp_path / "cosine_softmax/seed0/model.ckpt"))
    with pytest.raises(common.UserError, match="linear head"):
        itc.convert(lin)
    with pytest.raises(common.UserError, match="--objective softmax contradicts"):
        itc.convert(lin, objective="softmax")
    with pytest.raises(common.UserError, match="--seed 4 contradicts"):
        itc.convert(lin, seed=4)
    other = dummy_resnet(str(tmp_path / "elsewhere/model.ckpt"))
    with pytest.raises(common.UserError, match="pass --objective"):
        itc.convert(other)
    err = run_cli(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "elsewhere/model.ckpt is not in an <objective>/seed<k>/ folder" in err
    err = run_cli(["--checkpoint", "gs://gresearch/loss_functions_transfer/checkpoints/softmax/"
                   "seed0/model.ckpt", "--out", str(tmp_path / "x.pt")], capsys)
    assert "download gs://" in err


def test_prefix_may_be_given_as_a_file_name(tf_tree, tmp_path):
    index = str(tf_tree / "softmax" / "seed3" / "model.ckpt.index")
    itc.main(["--checkpoint", index, "--out", str(tmp_path / "s.pt")])
    assert common.load_checkpoint(str(tmp_path / "s.pt"))["args"]["seed"] == 3


# ----------------------------------------------------------------------------------------------
# The paper's networks by name: --checkpoint paper:OBJECTIVE/seedK, downloaded once from a local
# stand-in for the bucket, converted, cached (issue 27)

class Bucket:
    """An HTTP server on 127.0.0.1 serving a folder in the bucket's layout (<objective>/seed<k>/
    model.ckpt.*) under /ckpts, as GCS does: Content-Length on HEAD and GET, and the
    x-goog-hash header that `hashes` gives for a URL path. `cut` holds URL paths whose GET closes
    the connection halfway through the body; `requests` logs every (method, path)."""

    def __init__(self, root):
        self.root, self.cut, self.hashes, self.requests = root, set(), {}, []
        bucket = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30                # a stuck client cannot hold the server

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body):
                bucket.requests.append((self.command, self.path))
                rel = self.path.removeprefix("/ckpts/")
                path = os.path.join(bucket.root, rel)
                if rel == self.path or not os.path.isfile(path):
                    self.send_error(404)
                    return
                size = os.path.getsize(path)
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                if self.path in bucket.hashes:
                    self.send_header("x-goog-hash", bucket.hashes[self.path])
                self.end_headers()
                if body:
                    with open(path, "rb") as f:
                        n = size // 2 if self.path in bucket.cut else size
                        self.wfile.write(f.read(n))      # then the connection closes (HTTP/1.0)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/ckpts"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A Bucket over an empty folder (tests put files in .root), PAPER_CHECKPOINTS_URL pointing
    at it and torch's cache (TORCH_HOME) in tmp_path. Connecting anywhere but 127.0.0.1 fails
    the test; the server stops with the test."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return real_connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    b = Bucket(str(tmp_path / "bucket"))
    monkeypatch.setenv("PAPER_CHECKPOINTS_URL", b.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(itc, "DOWNLOAD_TIMEOUT", 20)
    yield b
    b.stop()


def cache_folder(tmp_path):
    return tmp_path / "torch_home" / "hub" / "checkpoints" / "loss_functions_transfer"


def test_paper_names():
    names = common.checkpoint_names(["paper:all"])
    assert len(names) == 72 == len(set(names)) and names[0] == "paper:softmax/seed0"
    assert names[-1] == "paper:squared_error/seed7" and common.paper_network(names[9]) == \
        ("label_smoothing", 1)
    assert common.checkpoint_label("paper:cosine_softmax/seed4") == "cosine_softmax_s4"
    for bad in ("paper:softmax/seed8", "paper:nope/seed0", "paper:softmax", "paper:"):
        with pytest.raises(common.UserError, match="the paper's are paper:OBJECTIVE/seedK"):
            common.checkpoint_names([bad])
    with pytest.raises(common.UserError, match="paper:all names 72 networks and this script "
                                               "takes one"):
        common.checkpoint_name("paper:all")


def test_paper_network_downloaded_converted_cached(tf_tree, bucket, tmp_path, capsys):
    """First use: both files fetched (HEAD, then GET), converted to TF's outputs, cached under
    TORCH_HOME; later uses load the cache without a request. The identity is the importer's
    (label, run id), with the name as checkpoint_path; a script takes the name too."""
    bucket.root = str(tf_tree)
    prefix = "/ckpts/softmax/seed3/model.ckpt"
    data = tf_tree / "softmax" / "seed3" / "model.ckpt.data-00000-of-00001"
    crc = itc.crc32c(data.read_bytes()).to_bytes(4, "big")   # checked as GCS gives it
    bucket.hashes[prefix + ".data-00000-of-00001"] = f"crc32c={base64.b64encode(crc).decode()}"
    model, info = common.load_pretrained("paper:softmax/seed3")
    assert bucket.requests == [(m, prefix + ext) for ext in (".index", ".data-00000-of-00001")
                               for m in ("HEAD", "GET")]
    out = capsys.readouterr().out
    assert f"paper:softmax/seed3: downloading {bucket.url}/softmax/seed3/model.ckpt.index" in out
    cached = cache_folder(tmp_path) / "softmax_s3.pt"
    assert f"converted, cached as {cached}" in out
    assert os.listdir(cache_folder(tmp_path)) == ["softmax_s3.pt"]    # no temporary left
    assert (info["checkpoint"], info["checkpoint_path"], info["objective"], info["seed"]) == \
        ("softmax_s3", "paper:softmax/seed3", "softmax", 3)
    assert info["run_id"] == itc.released_run_id("softmax", 3, "x")
    assert info["checkpoint_hash"] == common.file_hash(str(cached))
    # the same weights as converting the files by hand
    by_hand = itc.convert(str(tf_tree / "softmax" / "seed3" / "model.ckpt"))
    assert common.load_checkpoint(str(cached))["checksum"] == by_hand["checksum"]
    ref = dict(np.load(os.path.join(FIX, "resnet50_outputs.npz")))
    got = scripts_outputs(model, gen.images(gen.BATCHES["a"]))
    assert rel_err(got["logits"], ref["dense_a_logits"][:, 1:]) < 1e-4
    assert rel_err(got["pool"], ref["a_pool"]) < 1e-4

    bucket.requests.clear()                                  # later uses: the cache only
    assert common.load_pretrained("paper:softmax/seed3")[1] == info
    out = tmp_path / "sep"
    class_separation.main(["--checkpoint", "paper:softmax/seed3", "--data", "digits@0-4",
                           "--max-per-class", "2", "--resolution", "32", "--out", str(out)])
    assert bucket.requests == []
    with open(out / "class_separation.json") as f:
        assert json.load(f)["networks"] == [info]


def test_paper_network_failures_are_one_line_and_cache_nothing(bucket, tmp_path, capsys):
    """A file missing on the server (404), a download cut off mid-body, files that are not a
    released ResNet-50 (TF's own tiny checkpoint) and a damaged cache: one line each, exit 2,
    and nothing half-written is kept or loaded."""
    def fails(name):
        return one_line_error(capsys, lambda: common.load_pretrained(name))
    folder = cache_folder(tmp_path)
    for objective in ("softmax", "sigmoid"):     # TF's tiny checkpoint, under two names
        os.makedirs(os.path.join(bucket.root, objective, "seed1"))
        for ext in (".index", ".data-00000-of-00001"):
            shutil.copy(os.path.join(FIX, "tiny.ckpt" + ext),
                        os.path.join(bucket.root, objective, "seed1", "model.ckpt" + ext))
    err = fails("paper:softmax/seed0")
    assert err == (f"error: paper:softmax/seed0: cannot download {bucket.url}/softmax/seed0/"
                   f"model.ckpt.index (HTTP 404 Not Found: not on the server); nothing was "
                   f"cached, rerun to try again")
    bucket.cut.add("/ckpts/sigmoid/seed1/model.ckpt.data-00000-of-00001")
    size = os.path.getsize(os.path.join(FIX, "tiny.ckpt.data-00000-of-00001"))
    err = fails("paper:sigmoid/seed1")
    assert (f"model.ckpt.data-00000-of-00001 (the connection closed after {size // 2:,} of "
            f"{size:,} bytes); nothing was cached" in err)
    index = "/ckpts/softmax/seed1/model.ckpt.index"   # bytes that differ from the server's
    bucket.hashes[index] = f"crc32c=AAAAAA==, md5={base64.b64encode(bytes(16)).decode()}"
    err = fails("paper:softmax/seed1")
    assert "model.ckpt.index (its content does not match the hash the server gives)" in err
    del bucket.hashes[index]
    err = fails("paper:softmax/seed1")        # downloaded whole, but not a ResNet-50
    assert err.startswith(f"error: paper:softmax/seed1: {bucket.url}/softmax/seed1/model.ckpt: "
                          f"tensor(s) ") and err.endswith("(nothing was cached)")
    assert os.listdir(folder) == []           # no .pt, no temporary folder, no partial file
    # a damaged cache: truncated, or a flipped bit in a weight (the checkpoint's checksum)
    model = common.build_model("softmax", 5, arch="resnet18")
    ck = common.make_checkpoint(model, {"objective": "softmax", "hparams": {}, "arch": "resnet18",
                                        "num_classes": 5, "small_input": True})
    cached = str(folder / "softmax_s2.pt")
    common.save_checkpoint(cached, ck)
    raw = bytearray(open(cached, "rb").read())
    open(cached, "wb").write(raw[:len(raw) // 2])
    err = fails("paper:softmax/seed2")
    assert err.startswith(f"error: paper:softmax/seed2: the cached {cached} is corrupt or "
                          f"truncated") and err.endswith("; delete it and rerun to download the "
                                                         "network again")
    torch.save({**ck, "model": {**ck["model"], "fc.bias": ck["model"]["fc.bias"] + 1}}, cached)
    err = fails("paper:softmax/seed2")
    assert f"the cached {cached} is corrupt: its weights do not match the checksum" in err
    assert bucket.requests[-1][1] == "/ckpts/softmax/seed1/model.ckpt.data-00000-of-00001"


def test_an_output_file_holds_one_network(tf_tree, tmp_path, capsys):
    """Two imports of different networks to one .pt left only the second, without a lock
    (issue 25): the second is refused unless --overwrite; the same one again is a no-op."""
    soft = str(tf_tree / "softmax" / "seed3" / "model.ckpt")
    cos = str(tf_tree / "cosine_softmax" / "seed3" / "model.ckpt")
    out = str(tmp_path / "net.pt")
    itc.main(["--checkpoint", soft, "--out", out])
    capsys.readouterr()
    itc.main(["--checkpoint", soft, "--out", out])
    assert "already imported" in capsys.readouterr().out
    err = run_cli(["--checkpoint", cos, "--out", out], capsys)
    assert f"{out} holds another network (softmax, seed 3, 1000 classes, from {soft}); use " \
           f"another --out, or --overwrite to replace it" in err
    err = run_cli(["--checkpoint", soft, "--out", out, "--keep-background"], capsys)
    assert "holds another network (softmax, seed 3, 1000 classes" in err  # another computation
    assert common.load_checkpoint(out)["objective"] == "softmax"
    itc.main(["--checkpoint", cos, "--out", out, "--overwrite"])
    assert common.load_checkpoint(out)["objective"] == "cosine_softmax"
    assert sorted(os.listdir(tmp_path)) == ["net.pt"]          # no lock or temporary file left
    (tmp_path / "notes.txt").write_text("keep me")
    err = run_cli(["--checkpoint", soft, "--out", str(tmp_path / "notes.txt")], capsys)
    assert "notes.txt holds a file that is not a checkpoint of this project" in err


def test_an_output_file_being_written_is_refused(tf_tree, tmp_path, capsys):
    out = str(tmp_path / "net.pt")
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common\n"
            "with common.locked_file(sys.argv[2]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, ROOT, out], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err = run_cli(["--checkpoint", str(tf_tree / "softmax" / "seed3" / "model.ckpt"),
                       "--out", out], capsys)
        assert f"{out} is in use by pid {holder.pid} on " in err
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(out)

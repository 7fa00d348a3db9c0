import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def read_only(monkeypatch, folder):
    """Make `folder` read-only for this process, as a read-only mount does (chmod does not stop
    root, who runs the tests in some containers): making a folder or opening a file for writing
    under it fails with EROFS, and os.access says it is not writable."""
    import errno
    root = os.path.realpath(folder)
    os.makedirs(root, exist_ok=True)
    real_open, real_mkdir, real_access = os.open, os.mkdir, os.access

    def under(path):
        p = os.path.realpath(os.fspath(path))
        return p == root or p.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def fake_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if under(path):
            if os.path.isdir(path):  # as the kernel does: an existing folder is EEXIST
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            refuse(path)
        return real_mkdir(path, *a, **k)

    def fake_access(path, mode, *a, **k):
        return False if under(path) and mode & os.W_OK else real_access(path, mode, *a, **k)
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "access", fake_access)
    return str(folder)


def one_line_error(capsys, main):
    """Run main() as the scripts do (common.run_main) and return its stderr, asserting the
    outcome every refusal must have: exit status 2 and one line `error: ...`."""
    import pytest
    import common
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    return err


def non_finite_copy(path, out, name="layer2.0.conv1.weight", value=float("nan"), part="model"):
    """A copy of checkpoint `path` at `out` with one value of weight `name` set to `value`, its
    checksum rewritten: the NaN is what a diverged training saved, not a damaged file."""
    import torch
    import common
    ck = torch.load(path, weights_only=True)
    ck[part][name].view(-1)[0] = value
    ck["checksum"] = common.weights_checksum(ck)
    common.save_checkpoint(str(out), ck)
    return str(out)


def full_disk(monkeypatch, name_part):
    """The disk fills up while a file whose temporary name holds `name_part` is written."""
    import errno
    real_fsync = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

"""Saved folders: tied weights stay tied, every file is verified, saves are atomic, and
loading executes nothing unless the caller opts in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import spectrim
from spectrim._files import OutputExistsError
from spectrim.io import (
    MANIFEST_FILE,
    ORIGINAL_FILE,
    REPORT_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    ManifestError,
    load_compressed,
    save_compressed,
)
from spectrim.io.model_file import ModelFileError
from spectrim.zoo import DigitsCNN


class TinyLM(nn.Module):
    """Embedding, one residual FFN, and an LM head tied to the embedding."""

    def __init__(self, vocab: int = 40, d: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


class SharedMLP(nn.Module):
    """Two hidden layers sharing one weight matrix (``l3.weight = l2.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.l4 = nn.Linear(16, 3)
        self.l3.weight = self.l2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.l1(x))
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(x)))))


def _arch(cls: type) -> dict[str, str]:
    return {"class": f"{cls.__module__}.{cls.__qualname__}"}


@pytest.fixture(scope="module")
def digits_small() -> tuple[nn.Module, spectrim.CompressionReport]:
    torch.manual_seed(1)
    model = DigitsCNN().eval()
    return spectrim.compress(model, torch.randn(64, 1, 8, 8), target="macs=0.5")


# ------------------------------------------------------------------------------ tied weights


@pytest.mark.parametrize("target", ["error=0", "width=0.5", "macs=0.5"])
def test_shared_hidden_weight_stays_tied(target: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SharedMLP().eval()
    x = torch.randn(256, 8)
    small, report = spectrim.compress(net, x, target=target)
    assert small.l3.weight is small.l2.weight
    assert report.params_after <= report.params_before
    tied = [g for g in report.groups if g.pinned and "tied" in g.pinned]
    assert tied and "'l2.weight' is tied to 'l3.weight'" in tied[0].pinned
    save_compressed(small, tmp_path / "o", report, arch=_arch(SharedMLP))
    manifest = json.loads((tmp_path / "o" / MANIFEST_FILE).read_text())
    assert manifest["tied"] == {"l3.weight": "l2.weight"}
    base = SharedMLP()
    loaded = load_compressed(tmp_path / "o", base_model=base)
    assert loaded.l3.weight is loaded.l2.weight
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # rebuilt from the recorded class (given explicitly): tied too
    again = load_compressed(tmp_path / "o", classes=[SharedMLP])
    assert again.l3.weight is again.l2.weight
    with pytest.raises(TypeError, match=r"nn\.Module classes"):
        load_compressed(tmp_path / "o", classes=["SharedMLP"])  # type: ignore[list-item]


def test_lm_head_tied_to_embedding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = TinyLM().eval()
    ids = torch.randint(0, 40, (64, 12))
    small, report = spectrim.compress(lm, ids, target="width=0.5")
    assert small.head.weight is small.emb.weight
    assert small.up.out_features == 24  # the FFN is still compressed
    assert small.emb.embedding_dim == 16  # the tied stream is kept
    save_compressed(small, tmp_path / "lm", report)
    loaded = load_compressed(tmp_path / "lm", base_model=TinyLM())
    assert loaded.head.weight is loaded.emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids), small(ids))


def test_legacy_folder_with_untied_copies_is_refused(tmp_path: Path) -> None:
    """A format-1 folder of an untied compression (two different copies) must not load
    silently into a model that ties them (the second copy would win)."""
    torch.manual_seed(0)
    net = SharedMLP().eval()
    state = net.state_dict()
    state["l3.weight"] = state["l3.weight"] + 1.0  # what the old surgery produced
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(state, folder / STATE_FILE)
    manifest = {"format": "spectrim-manifest/1", "shapes": {}, "modules": {}, "arch": None}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="tied tensor in the model but differ"):
        load_compressed(folder, base_model=SharedMLP())


def test_legacy_state_dict_folder_still_loads(digits_small, tmp_path: Path) -> None:
    small, _ = digits_small
    folder = tmp_path / "v1"
    folder.mkdir()
    torch.save(small.state_dict(), folder / STATE_FILE)
    manifest = json.loads(json.dumps(spectrim.io.build_manifest(small, {"zoo": "digits-cnn"})))
    manifest["format"] = "spectrim-manifest/1"
    del manifest["files"], manifest["tied"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded = load_compressed(folder)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


# --------------------------------------------------------------------------------- checksums


def test_folder_holds_safetensors_and_checksums(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    out = save_compressed(small, tmp_path / "o", report, arch={"zoo": "digits-cnn"})
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, MANIFEST_FILE, REPORT_FILE}
    files = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {WEIGHTS_FILE, REPORT_FILE}
    assert files[WEIGHTS_FILE]["bytes"] == (out / WEIGHTS_FILE).stat().st_size


def test_bit_flip_in_weights_is_refused(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    out = save_compressed(small, tmp_path / "o", report, arch={"zoo": "digits-cnn"})
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x40  # a float's exponent: loads, gives NaN/huge outputs without the check
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        load_compressed(out)
    msg = str(info.value)
    assert str(out / WEIGHTS_FILE) in msg and "expected" in msg and "sha256" in msg


def test_weights_from_another_save_are_refused(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    a = save_compressed(small, tmp_path / "a", report, arch={"zoo": "digits-cnn"})
    other, _ = spectrim.compress(DigitsCNN().eval(), torch.randn(64, 1, 8, 8), target="macs=0.5")
    b = save_compressed(other, tmp_path / "b", arch={"zoo": "digits-cnn"})
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ManifestError, match="does not match"):
        load_compressed(a)
    (a / REPORT_FILE).write_text("{}")
    (a / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_compressed(a)


# ---------------------------------------------------------------------------- atomic saves


def test_existing_folder_is_refused_then_replaced_whole(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    out = tmp_path / "o"
    save_compressed(small, out, report, arch={"zoo": "digits-cnn"})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_compressed(small, out, arch={"zoo": "digits-cnn"})
    assert (out / REPORT_FILE).is_file()  # untouched by the refused save
    save_compressed(small, out, arch={"zoo": "digits-cnn"}, overwrite=True)
    # no stale report of the previous save, nothing of the old folder left
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, MANIFEST_FILE}
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary siblings
    load_compressed(out)


_KILLED_SAVE = """
import sys, time, torch, spectrim
import safetensors.torch as st
from spectrim.io import save_compressed
from spectrim.zoo import DigitsCNN
torch.manual_seed(2)
small, report = spectrim.compress(DigitsCNN().eval(), torch.randn(64, 1, 8, 8), target="macs=0.3")
real = st.save_file
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)   # the new weights are on disk ...
    print("written", flush=True)
    time.sleep(60)                           # ... and the process dies before the manifest
st.save_file = slow
save_compressed(small, sys.argv[1], report, arch={"zoo": "digits-cnn"}, overwrite=True)
"""


def test_kill_during_resave_keeps_the_previous_folder(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    out = save_compressed(small, tmp_path / "o", report, arch={"zoo": "digits-cnn"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVE), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, whole
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(x), small(x))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "o"]
    assert all(p.startswith(".o.tmp-") for p in leftovers)  # hidden, never read
    save_compressed(small, out, report, arch={"zoo": "digits-cnn"}, overwrite=True)


def test_unwritable_destination_fails_before_writing(digits_small) -> None:
    small, _ = digits_small
    t = time.perf_counter()
    with pytest.raises(OSError, match="/proc/spectrim-out"):
        save_compressed(small, "/proc/spectrim-out")
    assert time.perf_counter() - t < 5


# ---------------------------------------------------------------------- nothing is executed


def _folder_with_arch(digits_small, tmp_path: Path, arch: dict) -> Path:
    small, _ = digits_small
    out = save_compressed(small, tmp_path / "o", arch={"zoo": "digits-cnn"})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["arch"] = arch
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def test_arch_class_off_the_allow_list_is_not_imported(digits_small, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arch = {"class": "os.system", "kwargs": {"command": f"touch {marker}"}}
    out = _folder_with_arch(digits_small, tmp_path, arch)
    with pytest.raises(ManifestError, match="not on the allow-list"):
        load_compressed(out)
    assert not marker.exists()
    # on the allow-list but not a module class: refused before being called
    out = _folder_with_arch(
        digits_small, tmp_path / "b", {"class": "spectrim._files.atomic_write_text"}
    )
    with pytest.raises(ManifestError, match=r"not an nn\.Module class"):
        load_compressed(out)


def test_arch_kwargs_cannot_load_files(digits_small, tmp_path: Path) -> None:
    arch = {"class": "spectrim.zoo.CifarResNet", "kwargs": {"depth": 8, "checkpoint_path": "x"}}
    out = _folder_with_arch(digits_small, tmp_path, arch)
    with pytest.raises(ManifestError, match="may not set checkpoint_path"):
        load_compressed(out)


def test_pickled_original_needs_trust(digits_small, tmp_path: Path) -> None:
    small, report = digits_small
    original = tmp_path / "model.pt"
    torch.save(DigitsCNN().eval(), original)
    out = save_compressed(small, tmp_path / "o", report, original_file=original)
    original.unlink()  # self-contained: the copy in the folder is used
    with pytest.raises(ModelFileError, match="trust_pickle"):
        load_compressed(out)
    loaded = load_compressed(out, trust_code=True)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_torchscript_original_loads_without_trust(digits_small, tmp_path: Path) -> None:
    import warnings

    small, report = digits_small
    original = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(DigitsCNN().eval()), str(original))
    out = save_compressed(small, tmp_path / "o", report, original_file=original)
    original.unlink()
    assert json.loads((out / MANIFEST_FILE).read_text())["arch"] == {"file": ORIGINAL_FILE}
    loaded = load_compressed(out)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_arch_file_outside_the_folder_is_refused(digits_small, tmp_path: Path) -> None:
    out = _folder_with_arch(digits_small, tmp_path, {"file": "../model.pt"})
    with pytest.raises(ManifestError, match=r"no recorded checksum|not a file of the folder"):
        load_compressed(out)

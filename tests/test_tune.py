"""Tuned launch configs: the JSON store, its validation, the launchers reading it, and ``fusedtx tune``
end to end (in the interpreter on a CPU: the timings mean nothing there, the path is what is tested)."""

import json
import warnings

import pytest
import torch

import fusedtx
from fusedtx import reference, tune
from fusedtx.kernels import attention as kattention
from fusedtx.kernels import tuning
from tests.conftest import DEVICE
from tests.helpers import assert_close


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.TUNE_ENV, raising=False)
    monkeypatch.setattr(tuning, "_warned", set())
    tuning._tables.cache_clear()
    yield tmp_path
    tuning._tables.cache_clear()


def _q(n=33, d=16):
    return torch.randn(1, 2, n, d, device=DEVICE)


def test_round_trip_and_key_matching(config_dir):
    q = _q()
    key = kattention._tuning("fwd", q).key
    assert kattention._launch_config("fwd", q) != (16, 16, 2, 1)
    path = tuning.record(q.device, {key: (16, 16, 2, 1)})
    assert path.parent == config_dir and json.loads(path.read_text())["configs"][key] == [16, 16, 2, 1]
    assert kattention._launch_config("fwd", q) == (16, 16, 2, 1)  # the tuned config wins
    other = _q(n=300)  # another sequence-length bucket keeps the built-in choice
    assert kattention._tuning("fwd", other).key != key
    assert kattention._launch_config("fwd", other) == kattention._INTERPRETER_CONFIG["fwd"]
    k, v = _q(), _q()
    with fusedtx.use_backend("triton"):  # and the kernel computes right with it
        assert_close(fusedtx.attention(q, k, v), reference.attention(q.double(), k.double(), v.double()),
                     torch.float32)


@pytest.mark.parametrize("damage", ["corrupt", "foreign card", "other triton", "bad config"])
def test_stale_corrupt_or_foreign_files_are_ignored_with_one_warning(config_dir, damage):
    q = _q()
    key = kattention._tuning("fwd", q).key
    identity = tuning.device_identity(q.device)
    path = config_dir / tuning.file_name(identity)
    data = {**identity, "configs": {key: [16, 16, 2, 1]}}
    if damage == "foreign card":
        data["device"] = "NVIDIA GeForce RTX 4090"
    elif damage == "other triton":
        data["triton"] = "3.0.0"
    elif damage == "bad config":
        data["configs"][key] = [16, 16]
    path.write_text("{not json" if damage == "corrupt" else json.dumps(data))
    with pytest.warns(RuntimeWarning, match="ignoring tuned configs"):
        assert kattention._launch_config("fwd", q) == kattention._INTERPRETER_CONFIG["fwd"]
    tuning._tables.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert tuning.read_file(path, identity) == {}


def test_fusedtx_tune_times_the_candidates_and_writes_the_file(config_dir, capsys):
    assert tune.main(["--shapes", "1,2,33,16", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    files = list(config_dir.glob("*.json"))
    assert len(files) == 1
    configs = json.loads(files[0].read_text())["configs"]
    kinds = {key.split("|")[1] for key in configs}
    assert {"fwd", "dkdv", "dq"} <= kinds and all(key in out for key in configs)
    q = _q()
    assert kattention._launch_config("fwd", q) == tuple(configs[kattention._tuning("fwd", q).key])


def test_first_call_tunes_only_when_asked(config_dir, monkeypatch):
    q, k, v = _q(), _q(), _q()
    with fusedtx.use_backend("triton"):
        fusedtx.attention(q, k, v)
        assert not list(config_dir.glob("*.json")), "nothing is tuned unless asked"
        monkeypatch.setenv(tuning.TUNE_ENV, "1")
        out = fusedtx.attention(q, k, v)
    assert list(config_dir.glob("*.json"))
    assert_close(out, reference.attention(q.double(), k.double(), v.double()), torch.float32)


def test_first_call_tuning_with_no_fitting_candidate_launches_the_table_config(config_dir, monkeypatch):
    """FUSEDTX_TUNE=1 where no candidate fits while tuning: nothing is recorded and the launch goes on with the
    table's config (and, were it too large as well, the launch guard's smaller ones and then the fast PyTorch
    path), instead of an error reaching the user's model."""
    from triton.runtime import OutOfResources

    def never_fits(run, config, device):
        raise OutOfResources(1 << 20, 1 << 16, "shared memory")

    monkeypatch.setattr(tuning, "_time_ms", never_fits)
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    q, k, v = _q(), _q(), _q()
    with fusedtx.use_backend("triton"):
        out = fusedtx.attention(q, k, v)
    assert not list(config_dir.glob("*.json"))
    assert_close(out, reference.attention(q.double(), k.double(), v.double()), torch.float32)

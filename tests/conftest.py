"""Test setup shared by every family.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports Triton, so the Triton kernels
run on CPU tensors in Triton's interpreter: CI exercises the kernels themselves, not the references.
"""

import os
import sys
import tempfile

import torch

# Inductor's graph caches are keyed on the graph, not on our custom ops' fake implementations: a cache
# written by an earlier checkout would replay its fakes' strides. Each test run compiles afresh.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedtx-tests-inductor-")

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# bf16 arithmetic is wrong in Triton's interpreter (bf16 loads and stores are right): bf16 runs on GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


def pytest_report_header(config):
    from fusedtx import _backend

    mode = "CUDA" if ON_CUDA else "Triton interpreter on CPU (TRITON_INTERPRET=1)"
    backend, why = _backend.explain(DEVICE)
    return f"fusedtx tests: device {DEVICE}, kernels run via {mode}; backend {backend} ({why})"


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    return make


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every ``torch.empty``/``empty_like``/``new_empty`` during a test comes back filled with NaN, so an
    output element a kernel fails to write shows as NaN and fails the comparison."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed per test, so checks see fresh random inputs on every run. A failure's report shows it
    (section "seed"); FUSEDTX_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("FUSEDTX_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.add_report_section("call", "seed", str(seed))
    yield seed

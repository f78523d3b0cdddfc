"""The comparison helpers themselves: one wrong row among 4097 must fail, a right result must pass."""

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import ROW_FACTOR, TOLERANCE, assert_close, rel_error, row_errors

BF16 = torch.bfloat16


def _bf16_result(rows=4097, cols=64):
    """A float64 reference and a result rounded through bf16 (the error of a correct bf16 kernel)."""
    ref = torch.randn(rows, cols, dtype=torch.float64, device=DEVICE)
    return ref.to(BF16), ref


@pytest.mark.parametrize("wrong", ["half", "zeros"])
def test_one_wrong_row_fails_though_the_norm_criterion_passes(wrong):
    """The tail row of N = 4097 (the one a last block that covers one row computes) comes out wrong:
    half its value, or never written (zeros). That row carries 1/64 of the tensor's norm, so the
    norm-relative error stays within bf16's bound; the per-row criterion must reject it."""
    out, ref = _bf16_result()
    # The tail row at 0.8 of the typical row norm, so the norm criterion's verdict does not hang on how
    # large a random row came out (a zeroed row of typical norm sits right at bf16's bound).
    ref[-1] *= 0.8 * ref.norm(dim=1).square().mean().sqrt() / ref[-1].norm()
    out[-1] = (ref[-1] * 0.5).to(BF16) if wrong == "half" else 0
    bound = TOLERANCE[BF16]
    assert rel_error(out, ref) <= bound  # the old criterion accepts it
    assert row_errors(out, ref).argmax().item() == 4096
    with pytest.raises(AssertionError, match="row 4096 of 4097"):
        assert_close(out, ref, BF16)
    out[-1] = ref[-1].to(BF16)
    assert_close(out, ref, BF16)  # the same tensor with the row put right passes


def test_correct_results_pass_and_nan_never_does():
    out, ref = _bf16_result(rows=197, cols=80)
    assert_close(out, ref, BF16)
    # a row whose reference is nearly zero is held to the tensor's scale, not to its own norm
    ref[5] *= 1e-6
    out = ref.to(BF16) + (1e-3 * ref.norm(dim=1).mean() / 80**0.5) * torch.randn_like(ref).to(BF16)
    assert row_errors(out, ref)[5] <= ROW_FACTOR * TOLERANCE[BF16]
    assert_close(out, ref, BF16)
    nan = out.clone()
    nan[3, 7] = float("nan")
    assert torch.isnan(row_errors(nan, ref)[3])
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(nan, ref, BF16)
    # scalars and single rows are one row: the per-row bound is then ROW_FACTOR times the norm bound
    assert row_errors(torch.tensor(1.0), torch.tensor(1.0)).tolist() == [0.0]
    assert_close(torch.tensor([1.001]), torch.tensor([1.0]), torch.float16)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(torch.tensor([1.01]), torch.tensor([1.0]), torch.float16)

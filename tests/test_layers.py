"""tdBN against its formula in float64, and the time-merge container."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glif2 import TimeMerged, merge_time, split_time, tdBatchNorm


def test_tdbn_training_matches_formula_and_updates_running_stats():
    torch.manual_seed(0)
    T, B, C, H, W = 3, 4, 5, 6, 6
    bn = tdBatchNorm(C, alpha=1 / math.sqrt(2)).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(T * B, C, H, W, dtype=torch.float64) * 2 + 1
    y = bn(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)  # jointly over (t b) h w
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    scale = (1 / math.sqrt(2)) * 0.5  # alpha * v_th
    w, b = bn.weight[:, None, None], bn.bias[:, None, None]
    torch.testing.assert_close(y, scale * (x - mean) / torch.sqrt(var + 1e-5) * w + b, rtol=1e-10, atol=1e-10)
    n = T * B * H * W
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.flatten(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.flatten() * n / (n - 1), rtol=1e-10, atol=1e-12)
    assert bn.num_batches_tracked.item() == 1

    bn.eval()
    z = torch.randn(2, C, H, W, dtype=torch.float64)
    rm, rv = bn.running_mean[:, None, None], bn.running_var[:, None, None]
    torch.testing.assert_close(bn(z), scale * (z - rm) / torch.sqrt(rv + 1e-5) * w + b, rtol=1e-10, atol=1e-10)


def test_tdbn_state_dict_keeps_v_th_not_alpha():
    bn = tdBatchNorm(4, alpha=0.7)
    sd = bn.state_dict()
    assert sd["v_th"].item() == 0.5 and "alpha" not in sd
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "v_th"}


def test_tdbn_gradient_flows_through_batch_statistics():
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bn = tdBatchNorm(3).double()
    torch.autograd.gradcheck(lambda v: bn(v), (x,))


@given(t=st.integers(1, 4), b=st.integers(1, 3), rank=st.sampled_from([3, 5]))
def test_merge_split_round_trip(t, b, rank):
    x = torch.randn((t, b, 3) + (2, 5)[: rank - 3])
    merged = merge_time(x)
    assert merged.shape == (t * b, 3) + x.shape[3:]
    assert torch.equal(merged[b * (t - 1)], x[t - 1, 0])  # step-major: (t b)
    assert torch.equal(split_time(merged, t=t), x)


def test_time_merged_equals_per_step_layers():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = TimeMerged(conv, torch.nn.AvgPool2d(2))
    x = torch.randn(3, 2, 3, 8, 8)
    expected = torch.stack([torch.nn.functional.avg_pool2d(conv(x[t]), 2) for t in range(3)])
    torch.testing.assert_close(layer(x), expected)
    assert list(layer.state_dict()) == ["0.weight"]  # SpikingJelly's SeqToANNContainer naming


def test_merge_rejects_wrong_rank():
    with pytest.raises(ValueError, match="time-first"):
        merge_time(torch.zeros(2, 3, 4, 5))


def test_tdbn_eval_is_bitwise_the_reference_order_in_float32():
    # Released checkpoints must give identical float32 activations: a one-ulp change can flip a spike downstream.
    torch.manual_seed(3)
    bn = tdBatchNorm(6, alpha=1 / math.sqrt(2))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
        bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    x = torch.randn(16, 6, 5, 5)
    c = (None, slice(None), None, None)
    ref = bn.alpha * torch.tensor(0.5) * (x - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps)
    assert torch.equal(bn(x), ref * bn.weight[c] + bn.bias[c])

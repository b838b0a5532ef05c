"""bench/approximation_parity.py: its int8 simulation rounds as int8 arithmetic would."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from approximation_parity import _int8_activation, _int8_weight  # noqa: E402


def test_int8_weights_take_at_most_255_levels_per_output_channel_and_keep_its_largest():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3) * torch.linspace(0.01, 10, 8)[:, None, None, None]
    q = _int8_weight(w)
    assert q.shape == w.shape
    for out in range(8):
        scale = w[out].abs().max() / 127
        steps = q[out] / scale
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # a whole number of steps
        assert steps.abs().max() <= 127 + 1e-4
        assert torch.isclose(q[out].abs().max(), w[out].abs().max())
        assert (q[out] - w[out]).abs().max() <= scale / 2 + 1e-6  # rounded to the nearest step
    # One scale per output channel: a channel of small weights is not flattened to zero.
    assert q[0].abs().max() > 0


def test_int8_activations_take_at_most_256_values_spanning_the_tensors_range():
    torch.manual_seed(1)
    x = torch.randn(4, 16, 10, 10) * 3 - 1
    q = _int8_activation(x)
    assert len(torch.unique(q)) <= 256
    scale = (x.max() - x.min()) / 255
    assert (q - x).abs().max() <= scale / 2 + 1e-5
    assert torch.allclose(q.min(), x.min(), atol=scale / 2) and torch.allclose(q.max(), x.max(), atol=scale / 2)

"""ce and the performance-weighted loss against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxfair.errors import UsageError
from onnxfair.losses import loss_fn, pw_sample_weights, pw_targets

DENSE = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
Y = torch.tensor([0, 0, 1])


def test_pw_sample_weights_by_hand():
    # p_true = 0.9, 0.3, 0.4 -> w = 0.75 + 0.25 (1 - p)^5
    w = pw_sample_weights(DENSE, Y, beta=0.75, gamma=5.0)
    expected = [0.75 + 0.25 * 0.1**5, 0.75 + 0.25 * 0.7**5, 0.75 + 0.25 * 0.6**5]
    assert w.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(0.7920175, abs=1e-9)


def test_pw_targets_soft_where_dense_is_right_else_one_hot():
    t = pw_targets(DENSE, Y)
    # row 0: dense arg-max 0 == label -> dense distribution; rows 1, 2: dense wrong -> one-hot label
    assert t.tolist() == [[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]]


def test_pw_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, -0.5]], dtype=torch.float64)
    per_row = loss_fn(logits, Y, dense_probs=DENSE, kind="pw", reduction="none")

    def log_softmax(row):
        m = math.log(sum(math.exp(v) for v in row))
        return [v - m for v in row]

    targets = [[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]]
    weights = [0.75 + 0.25 * 0.1**5, 0.75 + 0.25 * 0.7**5, 0.75 + 0.25 * 0.6**5]
    expected = []
    for row, tgt, w in zip(logits.tolist(), targets, weights):
        ls = log_softmax(row)
        expected.append(w * -(tgt[0] * ls[0] + tgt[1] * ls[1]))
    assert per_row.tolist() == pytest.approx(expected, rel=1e-12)
    mean = loss_fn(logits, Y, dense_probs=DENSE, kind="pw", reduction="mean")
    assert float(mean) == pytest.approx(sum(expected) / 3, rel=1e-12)


def test_pw_with_zero_logits_is_weight_times_log2():
    per_row = loss_fn(torch.zeros(3, 2, dtype=torch.float64), Y, dense_probs=DENSE, kind="pw", reduction="none")
    w = pw_sample_weights(DENSE, Y)
    assert per_row.tolist() == pytest.approx((w * math.log(2)).tolist(), rel=1e-12)


def test_pw_gamma_zero_beta_any_is_soft_cross_entropy():
    logits = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = torch.softmax(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 1)
    y = torch.tensor([0, 1, 2, 1, 0])
    got = loss_fn(logits, y, dense_probs=dense, kind="pw", beta=0.3, gamma=0.0, reduction="none")
    soft = pw_targets(dense, y)
    assert got.tolist() == pytest.approx(F.cross_entropy(logits, soft, reduction="none").tolist(), rel=1e-12)


def test_ce_matches_torch_and_binary_logit_matches_bce():
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([2, 1])
    assert loss_fn(logits, y, kind="ce", reduction="none").tolist() == pytest.approx(
        F.cross_entropy(logits, y, reduction="none").tolist(), rel=1e-12)
    z = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    yb = torch.tensor([1, 0, 0])
    expected = F.binary_cross_entropy_with_logits(z[:, 0], yb.double(), reduction="none")
    assert loss_fn(z, yb, kind="ce", reduction="none").tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert loss_fn(z[:, 0], yb, kind="ce", reduction="none").tolist() == pytest.approx(expected.tolist(), rel=1e-12)


def test_loss_errors_are_usage_errors():
    logits = torch.zeros(3, 2)
    with pytest.raises(UsageError, match="dense"):
        loss_fn(logits, Y, kind="pw")
    with pytest.raises(UsageError, match="unknown loss"):
        loss_fn(logits, Y, kind="focal")
    with pytest.raises(UsageError, match="classes"):
        loss_fn(logits, Y, dense_probs=torch.ones(3, 3) / 3, kind="pw")
    with pytest.raises(UsageError, match="reduction"):
        loss_fn(logits, Y, reduction="sum")


def test_pw_accepts_numpy_dense_probs():
    logits = torch.zeros(3, 2)
    got = loss_fn(logits, Y, dense_probs=np.asarray(DENSE, dtype=np.float32), kind="pw", reduction="mean")
    assert float(got) == pytest.approx(float(pw_sample_weights(DENSE, Y).mean()) * math.log(2), rel=1e-6)


def test_labels_beyond_the_logits_are_refused_by_name():
    """A model whose class dim is symbolic lets such labels through loading: the loss is where they meet."""
    from onnxfair.errors import DataError

    with pytest.raises(DataError, match="label 'y' has values 5 in 1 rows; class indices must be in 0..2"):
        loss_fn(torch.zeros(3, 3), torch.tensor([0, 5, 1]))

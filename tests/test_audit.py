"""The membership-inference audit: no signal where there is none, a strong one on an overfit model."""

import numpy as np
import pytest
import torch

from fedtide.audit.membership import loss_threshold_attack, matched_by_class, sample_losses
from fedtide.data.datasets import load_dataset
from fedtide.models import build_model


def train(model, x, y, epochs, lr=0.01):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def test_attack_scores_separated_and_identical_losses_at_the_extremes():
    separated = loss_threshold_attack(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]))
    assert (separated.auc, separated.tpr_at_1pct_fpr) == (1.0, 1.0)
    same = loss_threshold_attack(np.full(50, 0.7), np.full(50, 0.7))
    assert same.auc == 0.5 and same.tpr_at_1pct_fpr == 0.0
    assert (same.members, same.nonmembers) == (50, 50)


def test_the_attacks_auc_is_sklearns_roc_auc_score_to_the_last_bit():
    """It is the area under the attack's own ROC curve, not sklearn recomputing the curve: the same number."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for size in (3, 40, 500):
        members, nonmembers = rng.exponential(0.5, size), rng.exponential(1.0, size).round(1)  # ties too
        truth = np.concatenate([np.ones(size), np.zeros(size)])
        expected = roc_auc_score(truth, -np.concatenate([members, nonmembers]))
        assert loss_threshold_attack(members, nonmembers).auc == float(expected)


def test_non_members_match_members_class_by_class():
    members = np.array([0, 0, 0, 1, 2, 2])
    pool = np.array([0, 1, 1, 1, 2, 2, 2, 2, 3])
    mine, theirs = matched_by_class(members, pool, np.random.default_rng(0))
    assert sorted(members[mine].tolist()) == sorted(pool[theirs].tolist()) == [0, 1, 2, 2]
    assert len(set(theirs.tolist())) == len(theirs)  # no non-member drawn twice


def test_null_audit_members_and_non_members_from_one_distribution_give_auc_near_half(digits):
    """Neither half of the test set was trained on: the attack must see nothing."""
    torch.manual_seed(0)
    model = train(build_model("mlp", (1, 8, 8), 10, seed=0), digits.train_x, digits.train_y, epochs=100)
    order = torch.randperm(len(digits.test_y), generator=torch.Generator().manual_seed(1))
    half = len(order) // 2
    a, b = order[:half], order[half : 2 * half]
    losses = sample_losses(model, digits.test_x, digits.test_y)
    result = loss_threshold_attack(losses[a.numpy()], losses[b.numpy()])
    assert result.members == result.nonmembers == half
    assert abs(result.auc - 0.5) < 0.08
    assert result.tpr_at_1pct_fpr < 0.1


def test_an_overfit_non_private_model_leaks_membership(digits):
    """50 training samples memorised: their loss sits below held-out samples' of the same classes.

    A loss threshold is a weak attack on a task this easy (most held-out digits are also
    classified with confidence): it reaches AUC ~0.66 here, far outside the null band.
    """
    torch.manual_seed(0)
    members = torch.arange(50)
    x, y = digits.train_x[members], digits.train_y[members]
    model = train(build_model("mlp", (1, 8, 8), 10, seed=0), x, y, epochs=1000)
    mine, theirs = matched_by_class(y.numpy(), digits.test_y.numpy(), np.random.default_rng(0))
    member_losses = sample_losses(model, x, y)[mine]
    nonmember_losses = sample_losses(model, digits.test_x, digits.test_y)[theirs]
    result = loss_threshold_attack(member_losses, nonmember_losses)
    assert result.members == result.nonmembers == 50
    assert result.auc > 0.62

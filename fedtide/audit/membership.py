"""An empirical privacy audit: a loss-threshold membership-inference attack on the final model.

DP-SGD's ε is an upper bound; this measures the leakage an actual attacker gets
(Yeom et al. 2018; the idea of TensorFlow Privacy's privacy report). The attacker
guesses "member" when a sample's loss under the published global model is low. For
each client, members are its own training samples (every experience it held) and
non-members are held-out test samples of the same classes, drawn per class in the
same numbers, so the attack cannot win by telling classes apart. The ROC of the
score -loss gives the AUC (0.5 = no leakage) and the true-positive rate at 1% false
positives (what matters for confident attacks: Carlini et al. 2022). Under a canary audit
the canaries are neither members nor non-members here (`fedtide.audit.canaries`
audits them). In a domain stream a member is a training image as the client trained on
it, under its experience's transform, and its non-members are test images under the same
transform: members and non-members are matched on (experience, class).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import auc, roc_curve
from torch.nn.functional import cross_entropy

from fedtide.data.datasets import ImageData, load_dataset
from fedtide.data.domains import domain_transforms, transformed
from fedtide.data.stream_plan import stream_plan
from fedtide.records.summary import LOW_FPR, ClientAudit
from fedtide.scenario.schema import Scenario


@torch.no_grad()
def sample_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Cross-entropy of every sample under `model` (in eval mode, on the CPU).

    Computed in float64: a memorised sample's float32 loss rounds to exactly 0, and the
    ties this makes between confident members and non-members would hide the leak.
    """
    model.eval()
    losses = [
        cross_entropy(model(x[i : i + batch_size]).double(), y[i : i + batch_size], reduction="none")
        for i in range(0, len(y), batch_size)
    ]
    return torch.cat(losses).numpy() if losses else np.zeros(0)


def loss_threshold_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> ClientAudit:
    """AUC and TPR at 1% FPR of the attack "member if loss < threshold", over every threshold.

    The AUC is the area under this ROC curve, which is what `roc_auc_score` computes for
    two classes after building the same curve again (half of the audit's time, once per client).
    """
    scores = -np.concatenate([member_losses, nonmember_losses])
    truth = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    fpr, tpr, _ = roc_curve(truth, scores)
    return ClientAudit(
        auc=float(auc(fpr, tpr)),
        tpr_at_1pct_fpr=float(tpr[fpr <= LOW_FPR].max()),
        members=len(member_losses),
        nonmembers=len(nonmember_losses),
    )


def matched_by_class(
    member_labels: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of members and of non-members (in the pool) with equal counts in every class."""
    members, nonmembers = [], []
    for label in np.unique(member_labels):
        mine = np.flatnonzero(member_labels == label)
        pool = np.flatnonzero(pool_labels == label)
        count = min(len(mine), len(pool))
        members.append(rng.choice(mine, count, replace=False))
        nonmembers.append(rng.choice(pool, count, replace=False))
    if not members:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(members), np.concatenate(nonmembers)


def audit_clients(scenario: Scenario, model: torch.nn.Module) -> dict:
    """The attack on each client's training data, with the mean and worst case over clients.

    Clients with no training data are left out. The draw of non-members is seeded by
    the scenario seed and the client, so an audit is reproducible.
    """
    data = load_dataset(scenario.dataset.name, scenario.dataset.root)
    plan = stream_plan(scenario)
    model = model.cpu()
    images = AuditedImages(scenario, data, plan.held_out)
    test_losses = images.test_losses(model)
    per_client: dict[str, dict] = {}
    for client in range(scenario.partition.num_clients):
        ids = plan.client(client).training_set_ids()
        if len(ids) == 0:
            continue
        rng = np.random.default_rng([scenario.seed, client])
        members, nonmembers = matched_by_class(images.member_keys(ids), images.test_keys, rng)
        if len(members) == 0:
            continue
        member_losses = sample_losses(model, *images.members(ids[members]))
        per_client[str(client)] = loss_threshold_attack(member_losses, test_losses[nonmembers]).to_dict()
    aucs = [r["auc"] for r in per_client.values()]
    tprs = [r["tpr_at_1pct_fpr"] for r in per_client.values()]
    return {
        "attack": "loss threshold, members vs class-matched held-out test samples",
        "auc_mean": float(np.mean(aucs)) if aucs else None,
        "auc_max": max(aucs, default=None),
        "tpr_at_1pct_fpr_mean": float(np.mean(tprs)) if tprs else None,
        "tpr_at_1pct_fpr_max": max(tprs, default=None),
        "per_client": per_client,
    }


class AuditedImages:
    """The images the attack scores, and the keys members and non-members are matched on.

    A class stream's sample ids index the training set, and the key is the class. A domain
    stream's sample id d·N + i is training image i under experience d's transform (what the
    client trained on); the non-members are the held-out test images under each experience's
    transform, and the key d·C + class matches members and non-members on both.
    """

    def __init__(self, scenario: Scenario, data: ImageData, held_out: np.ndarray) -> None:
        self.data, self.held_out, self.n, self.classes = data, held_out, len(data.train_y), scenario.num_classes
        self.transforms = None
        if scenario.stream.kind == "domain":
            self.transforms = domain_transforms(scenario.stream, scenario.seed, data.train_x)
        copies = len(self.transforms) if self.transforms else 1
        labels = data.test_y.numpy()[held_out]
        self.test_keys = np.concatenate([d * self.classes + labels for d in range(copies)])

    def test_losses(self, model: torch.nn.Module) -> np.ndarray:
        """Every held-out test image's loss, in the order of `test_keys`."""
        if self.transforms is None:
            return sample_losses(model, self.data.test_x, self.data.test_y)[self.held_out]
        x, y = self.data.test_x[self.held_out], self.data.test_y[self.held_out]
        return np.concatenate([sample_losses(model, transformed(x, t), y) for t in self.transforms])

    def member_keys(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.n * self.classes + self.data.train_y.numpy()[ids % self.n]

    def members(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of training samples `ids`, as the clients trained on them."""
        images, labels = self.data.train_x[ids % self.n], self.data.train_y[ids % self.n]
        if self.transforms is None:
            return images, labels
        return torch.stack([self.transforms[d](image) for d, image in zip(ids // self.n, images)]), labels

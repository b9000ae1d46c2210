"""ReIDLoss: each term alone and combined trains a tiny model; values against manual formulas."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from handclip.config import LossConfig
from handclip.errors import UserError
from handclip.losses import ReIDLoss

NUM_CLASSES, PER_CLASS, IN_DIM = 8, 4, 16
BRANCH_DIMS = [16, 8]
ALL_OFF = dict(ce=0.0, triplet=0.0, center=0.0, supcon=0.0, arcface=0.0, i2t=0.0)


def loss_config(**weights) -> LossConfig:
    return dataclasses.replace(LossConfig(), **{**ALL_OFF, **weights})


class TwoBranchModel(nn.Module):
    """Linear stand-in for ReIDModel: two branches with their own feature size and classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(IN_DIM, dim) for dim in BRANCH_DIMS)
        self.classify = nn.ModuleList(nn.Linear(dim, NUM_CLASSES) for dim in BRANCH_DIMS)
        self.text = nn.Linear(IN_DIM, NUM_CLASSES)  # stands in for the image-to-text logits

    def forward(self, x):
        metric = [embed(x) for embed in self.embed]
        return {"metric": metric, "logits": [cls(f) for cls, f in zip(self.classify, metric)]}


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    means = torch.randn(NUM_CLASSES, IN_DIM, generator=generator)
    x = means[labels] + 0.7 * torch.randn(len(labels), IN_DIM, generator=generator)
    return x, labels


def train(cfg: LossConfig, x, labels, steps=30) -> list[float]:
    torch.manual_seed(0)
    model = TwoBranchModel()
    loss_fn = ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS, with_text=True)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.non_center_parameters()], lr=1e-2)
    centers = list(loss_fn.center_parameters())
    center_optimizer = torch.optim.SGD(centers, lr=cfg.center_lr) if centers else None
    history = []
    for _ in range(steps):
        total, _ = loss_fn(model(x), labels, model.text(x))
        optimizer.zero_grad()
        if center_optimizer:
            center_optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if center_optimizer:
            center_optimizer.step()
        history.append(total.item())
    return history


@pytest.mark.parametrize("weights", [
    dict(ce=1.0),
    dict(triplet=1.0),
    dict(triplet=1.0, triplet_soft=True),
    dict(center=1.0),
    dict(supcon=1.0),
    dict(arcface=1.0),
    dict(i2t=1.0),
    dict(ce=1.0, triplet=1.0, center=0.0005, supcon=0.5, arcface=0.5, i2t=0.5),
], ids=["ce", "triplet", "soft-triplet", "center", "supcon", "arcface", "i2t", "all"])
def test_each_term_and_the_combination_train(weights, data):
    history = train(loss_config(**weights), *data)
    assert history[-1] < 0.7 * history[0], history


def test_terms_listed_are_the_weighted_ones_and_total_is_their_weighted_sum(data):
    x, labels = data
    model = TwoBranchModel()
    cfg = loss_config(ce=1.0, triplet=0.5, supcon=0.25, i2t=2.0)
    total, terms = ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS, with_text=True)(model(x), labels, model.text(x))
    assert set(terms) == {"ce", "triplet", "supcon", "i2t"}
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())
    expected = terms["ce"] + 0.5 * terms["triplet"] + 0.25 * terms["supcon"] + 2.0 * terms["i2t"]
    torch.testing.assert_close(total.detach(), expected)
    with pytest.raises(UserError, match="loss.i2t"):  # a model without identity texts: never silently skipped
        ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS)


def test_all_weights_zero_is_a_user_error():
    with pytest.raises(UserError, match="loss"):
        ReIDLoss(loss_config(), NUM_CLASSES, BRANCH_DIMS)


def manual_smoothed_ce(logits, labels, eps):
    log_p = logits.log_softmax(dim=1)
    return ((1 - eps) * -log_p[torch.arange(len(labels)), labels] + eps * -log_p.mean(dim=1)).mean()


def test_label_smoothed_cross_entropy_matches_the_formula_averaged_over_branches(data):
    x, labels = data
    outputs = TwoBranchModel()(x)
    _, terms = ReIDLoss(loss_config(ce=1.0, label_smoothing=0.2), NUM_CLASSES, BRANCH_DIMS)(outputs, labels)
    expected = sum(manual_smoothed_ce(logits, labels, 0.2) for logits in outputs["logits"]) / 2
    torch.testing.assert_close(terms["ce"], expected.detach())


def test_i2t_is_smoothed_cross_entropy_of_the_text_logits(data):
    x, labels = data
    model = TwoBranchModel()
    text_logits = model.text(x)
    loss_fn = ReIDLoss(loss_config(i2t=1.0, label_smoothing=0.1), NUM_CLASSES, BRANCH_DIMS, with_text=True)
    _, terms = loss_fn(model(x), labels, text_logits)
    torch.testing.assert_close(terms["i2t"], manual_smoothed_ce(text_logits, labels, 0.1).detach())


def manual_batch_hard(features, labels, margin, soft):
    """Per-anchor losses: hardest positive against hardest negative."""
    dist = torch.cdist(features, features)
    losses = []
    for i in range(len(labels)):
        positives = [dist[i, j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        negatives = [dist[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
        gap = max(positives) - min(negatives)
        losses.append(F.softplus(gap) if soft else F.relu(gap + margin))
    return torch.stack(losses)


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_matches_a_manual_loop(soft):
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    far_away = (labels == 3).float().unsqueeze(1) * 10  # class 3's anchors meet the margin
    features = [torch.randn(10, dim, generator=generator) + far_away for dim in BRANCH_DIMS]
    cfg = loss_config(triplet=1.0, triplet_margin=0.3, triplet_soft=soft)
    _, terms = ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS)({"metric": features, "logits": []}, labels)
    per_anchor = [manual_batch_hard(f, labels, 0.3, soft) for f in features]
    if not soft:  # the mean runs over all anchors, the satisfied ones (loss 0) included, as in BoT
        assert all((losses == 0).any() and (losses > 0).any() for losses in per_anchor)
    torch.testing.assert_close(terms["triplet"], sum(losses.mean() for losses in per_anchor) / 2)


def pml_batch_hard(features, labels, margin, soft):
    """The former implementation: pytorch-metric-learning's miner and loss (syncs with the GPU)."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    miner = BatchHardMiner(distance=LpDistance(normalize_embeddings=False))
    loss = TripletMarginLoss(margin=0.0 if soft else margin, smooth_loss=soft,
                             distance=LpDistance(normalize_embeddings=False), reducer=MeanReducer())
    return loss(features, labels, miner(features, labels))


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5],  # P x K with uneven K
    [0, 0, 1, 2, 2, 2, 3],  # anchors without a positive (1, 3) take no part
    [0, 0, 0, 0],  # no negative anywhere: 0
    [0, 1, 2, 3],  # no positive anywhere: 0
], ids=["pk", "singletons", "one-identity", "no-pairs"])
def test_device_batch_hard_triplet_equals_pytorch_metric_learning(labels, soft):
    from handclip.losses.terms import BatchHardTriplet

    generator = torch.Generator().manual_seed(len(labels))
    labels = torch.tensor(labels)
    base = torch.randn(len(labels), 12, generator=generator)
    base[1] = base[0]  # a zero distance (cdist's gradient there) and tied hardest positives
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    value = BatchHardTriplet(0.3, soft)(ours, labels)
    expected = pml_batch_hard(theirs, labels, 0.3, soft)
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), rtol=1e-6, atol=1e-7)
    value.backward()
    if torch.is_tensor(expected) and expected.requires_grad:
        expected.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
    else:  # PML returns a constant 0 without pairs; ours keeps the graph, with a zero gradient
        assert value.item() == 0.0 and not ours.grad.any()


def test_center_loss_matches_the_formula(data):
    x, labels = data
    outputs = TwoBranchModel()(x)
    loss_fn = ReIDLoss(loss_config(center=1.0), NUM_CLASSES, BRANCH_DIMS)
    _, terms = loss_fn(outputs, labels)
    centers = list(loss_fn.center_parameters())
    expected = sum(((f - c[labels]) ** 2).sum(dim=1).mean() for f, c in zip(outputs["metric"], centers)) / 2
    torch.testing.assert_close(terms["center"], expected.detach())


def test_center_gradients_do_not_depend_on_the_weight_but_feature_gradients_do(data):
    x, labels = data
    model = TwoBranchModel()
    features = [f.detach().requires_grad_() for f in model(x)["metric"]]
    torch.manual_seed(0)
    loss_fn = ReIDLoss(loss_config(center=0.01), NUM_CLASSES, BRANCH_DIMS)
    total, _ = loss_fn({"metric": features, "logits": []}, labels)
    total.backward()
    for f, c in zip(features, loss_fn.center_parameters()):
        reference_c = c.detach().clone().requires_grad_()
        reference_f = f.detach().clone().requires_grad_()
        ((reference_f - reference_c[labels]) ** 2).sum(dim=1).mean().backward()
        torch.testing.assert_close(c.grad, reference_c.grad)  # unweighted, per branch
        torch.testing.assert_close(f.grad, 0.01 / 2 * reference_f.grad)  # weighted, branch-averaged


def test_center_parameters_are_separate_from_the_rest():
    loss_fn = ReIDLoss(loss_config(center=1.0, arcface=1.0), NUM_CLASSES, BRANCH_DIMS)
    centers = list(loss_fn.center_parameters())
    others = list(loss_fn.non_center_parameters())
    assert [tuple(c.shape) for c in centers] == [(NUM_CLASSES, dim) for dim in BRANCH_DIMS]
    assert len(others) == len(BRANCH_DIMS)  # one ArcFace weight matrix per branch
    assert {id(p) for p in centers}.isdisjoint(id(p) for p in others)
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in centers + others}
    assert list(ReIDLoss(loss_config(ce=1.0), NUM_CLASSES, BRANCH_DIMS).parameters()) == []


def test_pair_losses_without_positive_pairs_are_zero_and_backpropagate(data):
    x, _ = data
    distinct = torch.arange(NUM_CLASSES)
    model = TwoBranchModel()
    total, terms = ReIDLoss(loss_config(ce=1.0, triplet=1.0, supcon=1.0), NUM_CLASSES, BRANCH_DIMS)(
        model(x[::PER_CLASS]), distinct)
    assert terms["triplet"].item() == 0.0 and terms["supcon"].item() == 0.0
    total.backward()
    assert model.classify[0].weight.grad is not None


def test_losses_run_in_float32_under_bf16_autocast(data):
    x, labels = data
    model = TwoBranchModel()
    loss_fn = ReIDLoss(loss_config(ce=1.0, triplet=1.0, center=0.1, arcface=1.0), NUM_CLASSES, BRANCH_DIMS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
        assert outputs["metric"][0].dtype == torch.bfloat16
        total, _ = loss_fn(outputs, labels)
    assert total.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loss_fn.parameters())  # PML ArcFace casts W to the input dtype
    total.backward()


def test_a_last_checkpoint_of_the_older_loss_layout_still_loads():
    cfg = loss_config(ce=1.0, center=0.0005, arcface=1.0)
    saved = ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS).state_dict()
    older = {key.replace("terms.", "").replace("branches.", ""): value for key, value in saved.items()}
    assert "center.1.centers" in older and "arcface.0.W" in older
    fresh = ReIDLoss(cfg, NUM_CLASSES, BRANCH_DIMS)
    fresh.load_state_dict(older)
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in saved.items())

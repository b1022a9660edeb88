"""Distillation: the loss against a hand computation, a frozen teacher, and a short fine-tune that follows it."""

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from orthoreg_tp import layer_widths
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.distill import Teacher, distillation_loss, kd_kl
from orthoreg_tp.engine.methods import build_importance, get_method
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import prune_round_
from orthoreg_tp.engine.training import build_optimizer, train_one_epoch


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    y = [1, 2]
    alpha, temp = 0.3, 2.0
    kl = sum(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(softmax(ti, temp), softmax(si, temp)))
             for si, ti in zip(s, t)) / 2
    ce = -sum(math.log(softmax(si, 1.0)[yi]) for si, yi in zip(s, y)) / 2
    expected = (1 - alpha) * ce + alpha * temp**2 * kl
    st, tt, yt = torch.tensor(s), torch.tensor(t), torch.tensor(y)
    assert float(kd_kl(st, tt, temperature=temp)) == pytest.approx(kl, rel=1e-6)
    assert float(distillation_loss(st, tt, yt, alpha=alpha, temperature=temp)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(st, tt, yt, alpha=0.0)) == pytest.approx(ce, rel=1e-6)
    assert float(distillation_loss(st, tt, yt, alpha=1.0, temperature=temp)) == pytest.approx(temp**2 * kl, rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature")])
def test_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), **kwargs)


def test_teacher_gets_no_gradient_and_stays_frozen():
    model = build_model("tiny_cnn", num_classes=10)
    teacher = Teacher(model, alpha=0.5, temperature=4.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    opt = build_optimizer(model, lr=0.1)
    train_one_epoch(model, [(x, y)] * 3, opt, device=torch.device("cpu"), progress=False, teacher=teacher)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN buffers included
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


def test_distillation_pulls_the_student_towards_the_teacher():
    torch.manual_seed(0)
    train_set, test_set, _ = build_datasets("digits", image_size=16)
    loader = DataLoader(Subset(train_set, range(768)), batch_size=64, shuffle=True)
    teacher_model = build_model("tiny_cnn", num_classes=10)
    opt = build_optimizer(teacher_model, lr=0.05)
    for _ in range(3):
        train_one_epoch(teacher_model, loader, opt, device=torch.device("cpu"), progress=False)
    student = copy.deepcopy(teacher_model)
    imp = build_importance(get_method("l1"), layer_widths(student))
    prune_round_(student, torch.zeros(1, 3, 16, 16), imp, ratio=0.6)
    teacher = Teacher(teacher_model, alpha=0.5, temperature=4.0)
    x_test = test_set.tensors[0]

    def kl(model):
        model.eval()
        with torch.no_grad():
            return float(kd_kl(model(x_test), teacher.logits(x_test), temperature=4.0))

    results = {}
    for name, t in (("ce", None), ("kd", teacher)):
        torch.manual_seed(1)
        s = copy.deepcopy(student)
        opt = build_optimizer(s, lr=0.02)
        train_one_epoch(s, loader, opt, device=torch.device("cpu"), progress=False, teacher=t)
        results[name] = kl(s)
    start = kl(copy.deepcopy(student))
    assert results["kd"] < start and results["kd"] < results["ce"], (start, results)

import pytest
import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp import OrthoRegImportance, OrthoRegPruner, cumulative_schedule, paper_schedule


def test_sparse_training_loop_with_pruning_steps(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(1, (16, 32), 4)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    pruner = OrthoRegPruner(
        model, x[:1], coefficient=1e-2, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model[8]]
    )
    assert isinstance(pruner.importance, OrthoRegImportance)
    assert pruner.global_pruning and pruner.importance.floor is not None  # the floor lives in the scores
    assert [n for n, _ in pruner.regularizer.layers] == ["0", "3"]
    for _ in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)  # parameters are replaced by pruning: rebuild
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads_before = model[0].weight.grad.clone()
            pruner.regularize(model)
            assert not torch.equal(grads_before, model[0].weight.grad)
            opt.step()
        pruner.importance.reset()
        pruner.importance.accumulate(model, [(x, y)], num_samples=32, progress=False)
        pruner.step()
        pruner.update_regularizer()
    assert pruner.achieved_ratio == pytest.approx(0.5, abs=0.02)
    assert model[0].out_channels + model[3].out_channels == 24
    assert model(x).shape == (32, 4)
    # the regularizer follows the pruned shapes
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    nn.functional.cross_entropy(model(x), y).backward()
    pruner.regularize(model)
    assert model[3].weight.grad.shape == model[3].weight.shape


def test_paper_schedule_drives_torch_pruning_rounds(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(1, (16, 32), 4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    pruner = OrthoRegPruner(
        model,
        x[:1],
        pruning_ratio=0.75,
        iterative_steps=3,
        ignored_layers=[model[8]],
        iterative_pruning_ratio_scheduler=lambda r, n: [0.0] + cumulative_schedule(r, n),
    )
    total = 48
    remaining = total
    for r in paper_schedule(0.75, 3):
        pruner.importance.reset()
        pruner.importance.accumulate(model, [(x, y)], num_samples=16, progress=False)
        pruner.step()
        remaining = round(remaining * (1 - r))
        assert model[0].out_channels + model[3].out_channels == pytest.approx(remaining, abs=1)
    assert pruner.achieved_ratio == pytest.approx(0.75, abs=0.03)


def test_forwards_kwargs_to_torch_pruning(tiny_cnn):
    model = tiny_cnn(1, (16, 32), 4)
    pruner = OrthoRegPruner(
        model,
        torch.randn(1, 1, 8, 8),
        pruning_ratio=0.3,
        global_pruning=False,
        round_to=4,
        ignored_layers=[model[8]],
    )
    assert isinstance(pruner, tp.pruner.BasePruner)
    assert pruner.round_to == 4 and not pruner.global_pruning and pruner.pruning_ratio == 0.3


def test_step_before_accumulation_raises(tiny_cnn):
    model = tiny_cnn(1, (16, 32), 4)
    pruner = OrthoRegPruner(model, torch.randn(1, 1, 8, 8), ignored_layers=[model[8]])
    with pytest.raises(RuntimeError, match="accumulate"):
        pruner.step()
    assert model[0].out_channels == 16  # nothing was pruned


def test_an_importance_without_a_floor_gets_the_papers_floor(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(1, (16, 32), 4)
    x = torch.randn(2, 1, 8, 8)
    pruner = OrthoRegPruner(model, x[:1], importance=tp.importance.MagnitudeImportance(normalizer=None),
                            pruning_ratio=0.9, ignored_layers=[model[8]])
    pruner.step()
    # 44 of 48 channels go; every layer keeps at least int(0.05 * width) + 1 of its own
    assert model[0].out_channels >= 1 and model[3].out_channels >= 2
    assert model[0].out_channels + model[3].out_channels == 4

"""OrthoRegCallback in real transformers Trainer runs: regularize, prune mid-training, reload checkpoints, DDP."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (in the dev extra)")

from orthoreg_tp import mean_orthonormality  # noqa: E402
from orthoreg_tp.integrations import load_pruned_checkpoint, pruning_history  # noqa: E402
from orthoreg_tp.integrations.transformers import OrthoRegCallback  # noqa: E402

X = {"pixel_values": torch.randn(1, 3, 8, 8)}

NET_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A tiny image classifier with the Trainer's calling convention (keyword inputs, a dict with the loss)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, 3))
        self.losses = []

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        if labels is None:
            return {"logits": logits}
        loss = nn.functional.cross_entropy(logits, labels)
        self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


class Images(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (self.x[:, 0].mean((1, 2)) > 0).long() + (self.x[:, 1].mean((1, 2)) > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}
'''
_ns: dict = {}
exec(compile(NET_SOURCE, "net_source", "exec"), _ns)  # the same classes run in the torchrun script below
Net, Images = _ns["Net"], _ns["Images"]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=16, num_train_epochs=2, learning_rate=0.05,
                optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="constant", save_strategy="no",
                report_to=[], use_cpu=True,
                logging_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=1.0, remove_unused_columns=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(out, callbacks, **kw):
    torch.manual_seed(0)
    model = Net()
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=Images(), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, trainer


@pytest.mark.slow
def test_regularizer_raises_orthonormality(tmp_path):
    plain, _ = _train(tmp_path / "a", [OrthoRegCallback(coefficient=0.0)], num_train_epochs=3)
    reg, _ = _train(tmp_path / "b", [OrthoRegCallback(coefficient=1e-2)], num_train_epochs=3)
    assert mean_orthonormality(reg.net) > mean_orthonormality(plain.net) + 0.02  # measured: 0.633 vs 0.550


class _Probe(transformers.TrainerCallback):
    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if int(state.epoch) == 1:
            self.weight = model.net[3].weight.detach().clone()
            self.opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.slow
def test_prune_mid_training_keeps_training_and_checkpoints_reload(tmp_path):
    probe = _Probe()
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=2)
    model, trainer = _train(tmp_path, [cb, probe], save_strategy="epoch")
    assert cb.report.params_after < cb.report.params_before
    assert model.net[3].weight.shape[0] < 16
    assert probe.opt_params == {id(p) for p in model.parameters()}
    assert probe.weight.shape == model.net[3].weight.shape
    assert not torch.equal(probe.weight, model.net[3].weight)  # the optimizer keeps updating the pruned layers
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert trainer.lr_scheduler.optimizer is trainer.optimizer.optimizer or trainer.lr_scheduler.optimizer is \
        trainer.optimizer

    ckpt = tmp_path / "checkpoint-8"
    for step in (4, 8):  # the end-of-epoch save of the pruning epoch comes after the prune
        assert pruning_history(tmp_path / f"checkpoint-{step}") == [list(h) for h in cb.report.history]
    fresh = load_pruned_checkpoint(Net(), ckpt, X)
    torch.testing.assert_close(fresh.eval()(**X)["logits"], model.eval()(**X)["logits"])


@pytest.mark.slow
def test_bf16_autocast_run_prunes_with_finite_loss(tmp_path):
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.3, example_inputs=X, importance_batches=2)
    model, _ = _train(tmp_path, [cb], bf16=True, max_grad_norm=0.0)
    assert cb.report.params_after < cb.report.params_before
    assert all(torch.isfinite(torch.tensor(model.losses)))


TORCHRUN_SCRIPT = NET_SOURCE + '''

if __name__ == "__main__":
    import json, os, sys, warnings
    import transformers
    from orthoreg_tp.integrations.transformers import OrthoRegCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net()
    args = transformers.TrainingArguments(
        output_dir=sys.argv[1], per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05, optim="sgd",
        save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
        remove_unused_columns=False, ddp_backend="gloo")
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5,
                          example_inputs={"pixel_values": torch.randn(1, 3, 8, 8)}, importance_batches=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(), callbacks=[cb])
    cb.bind(trainer)
    trainer.train()
    rank = int(os.environ["RANK"])
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"history": cb.core.history, "losses": model.losses,
                   "weight": model.net[3].weight.detach().flatten().tolist()}, f)
'''


@pytest.mark.slow
def test_torchrun_ranks_prune_the_same_channels(tmp_path):
    script = tmp_path / "hf_ddp.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] and ranks[0]["history"] == ranks[1]["history"]
    torch.testing.assert_close(torch.tensor(ranks[0]["weight"]), torch.tensor(ranks[1]["weight"]))
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)

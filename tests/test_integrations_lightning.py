"""OrthoRegCallback in real Lightning runs: regularize, prune mid-training, keep training, reload checkpoints."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from orthoreg_tp import mean_orthonormality  # noqa: E402
from orthoreg_tp.integrations import load_pruned_checkpoint, pruning_history, replay_checkpoint_  # noqa: E402
from orthoreg_tp.integrations.lightning import OrthoRegCallback  # noqa: E402

X = torch.randn(1, 3, 8, 8)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
        )
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def _loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _fit(callbacks, max_epochs=2, ckpt_dir=None, ckpt_path=None, module=None):
    torch.manual_seed(0)
    module = module or Net()
    if ckpt_dir is not None:
        callbacks = [*callbacks, pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)]
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.slow
def test_regularizer_raises_orthonormality():
    plain, _ = _fit([OrthoRegCallback(coefficient=0.0)], max_epochs=3)
    reg, _ = _fit([OrthoRegCallback(coefficient=1e-2)], max_epochs=3)
    assert mean_orthonormality(reg.net) > mean_orthonormality(plain.net) + 0.02  # measured: 0.627 vs 0.552


class _Probe(pl.Callback):
    """Weights and optimizer parameters at the start of the epoch after the prune."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.weight = pl_module.net[3].weight.detach().clone()
            self.opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


@pytest.mark.slow
def test_prune_mid_training_keeps_training_and_checkpoints_reload(tmp_path):
    probe = _Probe()
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=2)
    module, trainer = _fit([cb, probe], max_epochs=2, ckpt_dir=tmp_path)
    assert cb.report.params_after < cb.report.params_before
    assert module.net[3].weight.shape[0] < 16
    assert probe.opt_params == {id(p) for p in module.parameters()}  # the optimizer holds the pruned parameters
    assert probe.weight.shape == module.net[3].weight.shape
    assert not torch.equal(probe.weight, module.net[3].weight)  # and keeps updating them
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]

    ckpt = tmp_path / "epoch=1.ckpt"
    assert pruning_history(ckpt) == [list(h) for h in cb.report.history]
    fresh = load_pruned_checkpoint(Net(), ckpt, X)
    assert fresh.net[3].weight.shape == module.net[3].weight.shape
    torch.testing.assert_close(fresh.eval()(X), module.eval()(X))

    # resume the pruned run: replay first, Lightning loads weights and optimizer state; no second prune
    resumed = replay_checkpoint_(Net(), ckpt, X)
    cb2 = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=2)
    resumed, _ = _fit([cb2], max_epochs=3, ckpt_path=str(ckpt), module=resumed)
    assert cb2.report is None and cb2.core.pruned
    assert resumed.net[3].weight.shape == module.net[3].weight.shape


@pytest.mark.slow
def test_ema_copy_is_pruned_with_the_module():
    ema = pl.callbacks.EMAWeightAveraging(decay=0.9)
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=2)
    module, _ = _fit([cb, ema], max_epochs=2)  # at the end Lightning copies the average into the (pruned) module
    average = ema._average_model.module
    assert average.net[3].weight.shape == module.net[3].weight.shape < torch.Size([16, 16, 3, 3])
    torch.testing.assert_close(average.net[3].weight, module.net[3].weight)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="exactly one of ratio= and target="):
        OrthoRegCallback(prune_epoch=1, example_inputs=X)
    with pytest.raises(ValueError, match="example_inputs"):
        OrthoRegCallback(prune_epoch=1, ratio=0.5)
    with pytest.raises(ValueError, match="need prune_epoch"):
        OrthoRegCallback(ratio=0.5)
    with pytest.raises(ValueError, match="coefficient"):
        OrthoRegCallback(coefficient=-1.0)


DDP_SCRIPT = '''
import json, os, sys, warnings
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as pl
from orthoreg_tp.integrations.lightning import OrthoRegCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
        self.losses = []
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(float(loss.detach()))
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=torch.randn(1, 3, 8, 8),
                          importance_batches=2)
    model = Net()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[cb])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    out = {"history": cb.core.history, "losses": model.losses,
           "weight": model.net[2].weight.detach().flatten().tolist()}
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)
'''


@pytest.mark.slow
def test_ddp_ranks_prune_the_same_channels(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] and ranks[0]["history"] == ranks[1]["history"]
    torch.testing.assert_close(torch.tensor(ranks[0]["weight"]), torch.tensor(ranks[1]["weight"]))  # still in sync
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)

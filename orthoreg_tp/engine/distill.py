"""Knowledge distillation (Hinton et al., 2015): the loss, and a frozen teacher that supplies its logits.

The loss mixes the hard-label cross-entropy with the KL divergence between the teacher's and the student's
tempered distributions: ``(1 - alpha) * CE(s, y) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T))``.
The ``T**2`` factor keeps the soft term's gradients on the scale of the hard term's when ``T`` changes.

Defaults ``alpha = 0.5`` and ``T = 4``: an equal mix of hard and soft targets (neither signal dominates when
nothing is known about the task), at a temperature high enough to expose the teacher's ranking of the wrong
classes (the "dark knowledge") without flattening it. T = 4 is the KD temperature of the widely used CIFAR
distillation benchmark code of Tian et al. (RepDistiller, "Contrastive Representation Distillation", ICLR 2020:
``--kd_T 4``); Hinton et al. report good results over a range of temperatures.

Example:
    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> round(float(kd_kl(s, t, temperature=4.0)), 6)   # identical logits: no divergence
    0.0
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 4.0


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """Mean over the batch of ``KL(softmax(t / T) || softmax(s / T))`` (no ``T**2`` factor).

    Args:
        student_logits: ``(N, C)`` logits of the student.
        teacher_logits: ``(N, C)`` logits of the teacher (no gradient flows into them).
        temperature: ``T > 0``.

    Returns:
        A scalar tensor.

    Example:
        >>> float(kd_kl(torch.zeros(2, 3), torch.zeros(2, 3), temperature=2.0))
        0.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *,
                      alpha: float = DEFAULT_ALPHA, temperature: float = DEFAULT_TEMPERATURE,
                      label_smoothing: float = 0.0) -> Tensor:
    """``(1 - alpha) * CE(s, y) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T))``.

    Args:
        student_logits: ``(N, C)`` logits of the student.
        teacher_logits: ``(N, C)`` logits of the frozen teacher.
        targets: ``(N,)`` class indices.
        alpha: Weight of the soft (teacher) term, in ``[0, 1]``; 0 is plain cross-entropy.
        temperature: ``T > 0`` of both softmaxes.
        label_smoothing: Passed to the hard term's cross-entropy.

    Returns:
        A scalar tensor.

    Example:
        >>> s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
        >>> bool(distillation_loss(s, t, y, alpha=0.0) == F.cross_entropy(s, y))
        True
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return hard
    soft = kd_kl(student_logits, teacher_logits, temperature=temperature)
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


class Teacher:
    """A frozen copy of a model: eval mode, no gradients, never pruned or updated.

    Args:
        model: The model to copy (deep-copied; the original is untouched).
        alpha: Weight of the soft term (see :func:`distillation_loss`).
        temperature: Distillation temperature.

    Example:
        >>> teacher = Teacher(nn.Linear(4, 3))
        >>> s = torch.zeros(2, 3, requires_grad=True)
        >>> loss = teacher.loss(s, torch.randn(2, 4), torch.tensor([0, 1]))
        >>> loss.backward()
    """

    def __init__(self, model: nn.Module, *, alpha: float = DEFAULT_ALPHA,
                 temperature: float = DEFAULT_TEMPERATURE):
        if not 0.0 <= alpha <= 1.0 or not temperature > 0:
            raise ValueError(f"alpha must be in [0, 1] and temperature > 0, got {alpha!r}, {temperature!r}")
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)

    @torch.no_grad()
    def logits(self, inputs: Tensor) -> Tensor:
        """The teacher's logits for ``inputs`` (eval mode, no gradient)."""
        self.model.eval()
        return self.model(inputs)

    def loss(self, student_logits: Tensor, inputs: Tensor, targets: Tensor, *,
             label_smoothing: float = 0.0) -> Tensor:
        """:func:`distillation_loss` of the student's logits against this teacher's on the same inputs."""
        return distillation_loss(student_logits, self.logits(inputs), targets, alpha=self.alpha,
                                 temperature=self.temperature, label_smoothing=label_smoothing)

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's weights (for checkpoints)."""
        return self.model.state_dict()

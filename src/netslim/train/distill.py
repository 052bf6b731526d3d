"""Knowledge distillation from the unpruned network while a pruned one is fine-tuned.

The pruned network (the student) learns from the labels and from the network it was pruned
from (the teacher), as Hinton et al. (2015) distil: the loss of a step is

    cross_entropy(student, labels) + weight * T² * KL(softmax(teacher / T) || softmax(student / T))

with the KL divergence averaged over the batch. ``T²`` keeps the term's gradient on the
scale of the label loss whatever the temperature. The teacher runs in eval mode (its
BatchNorm statistics fixed) under ``torch.no_grad``: it never gets a gradient and its
weights never change.

Where the teacher comes from (:func:`teacher_path`): ``netslim prune`` records in the pruned
checkpoint the file it pruned (``netslim.teacher``), and fine-tuning distils from it by
default; ``--teacher PATH`` names another network; ``--no-distill`` turns it off (the loop
is then exactly the plain fine-tuning loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.checkpoint import model_from_checkpoint, read_checkpoint
from netslim.errors import NetslimError
from netslim.models import num_outputs

# Measured on CIFAR-10 fine-tuning (bench/RESULTS.md, issue 30): weight 1 at T 4, the
# literature's usual choice, did best of (1, 2), (1, 4), (1, 8), (3, 4) (48.2, 48.5, 47.4 and
# 40.3% after 5 epochs); a heavier term costs most.
WEIGHT = 1.0
TEMPERATURE = 4.0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch,
    computed in fp32 (the logits may come from autocast)."""
    t = float(temperature)
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


class Teacher:
    """A frozen network whose logits the student learns from (see the module docs)."""

    def __init__(self, model: nn.Module, weight: float = WEIGHT, temperature: float = TEMPERATURE):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    def to(self, device: torch.device) -> Teacher:
        self.model = self.model.to(device, memory_format=torch.channels_last).eval()
        return self

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """The weighted distillation term of a batch ``x`` whose student logits are given."""
        self.model.eval()  # a caller's model.train() must never reach the teacher
        with torch.no_grad():
            teacher_logits = self.model(x)
        return self.weight * distill_loss(student_logits, teacher_logits, self.temperature)


def recorded_teacher(meta: dict[str, Any]) -> str | None:
    """The unpruned network a pruned checkpoint's metadata names (``None``: none recorded)."""
    teacher = meta.get("teacher")
    return str(teacher) if teacher else None


def teacher_path(meta: dict[str, Any], given: str | None, distill: bool, what: str) -> str | None:
    """The teacher of a fine-tuning run: ``given`` (``--teacher``), else the network the
    checkpoint ``what`` was pruned from (its ``meta``); ``None`` when ``distill`` is off or
    nothing is recorded. A named file that is not there is one line naming the way out."""
    if not distill:
        return None
    if given:
        if not Path(given).is_file():
            raise NetslimError(
                f"--teacher {given} does not exist; name the unpruned network's checkpoint, "
                "or pass --no-distill"
            )
        return str(given)
    recorded = recorded_teacher(meta)
    if recorded and not Path(recorded).is_file():
        raise NetslimError(
            f"{what} was pruned from {recorded}, which is not there any more (fine-tuning "
            "distils from it by default); pass --teacher PATH to name it, or --no-distill"
        )
    return recorded


def load_teacher(
    path: str | Path,
    student: nn.Module,
    *,
    weight: float = WEIGHT,
    temperature: float = TEMPERATURE,
    trust: str | None = None,
) -> Teacher:
    """The network in ``path`` as the teacher of ``student``; refused (one line) when its
    outputs are not the student's classes."""
    checkpoint = read_checkpoint(path)
    arch = (checkpoint.get("netslim") or {}).get("arch", "")
    if str(arch).startswith("ultralytics:"):
        raise NetslimError(
            f"--teacher {path} is an Ultralytics YOLO; a classifier learns only from a "
            "classifier (netslim yolo finetune distils YOLOs)"
        )
    model = model_from_checkpoint(checkpoint, str(path), trust=trust)
    if num_outputs(model) != num_outputs(student):
        raise NetslimError(
            f"--teacher {path} has {num_outputs(model)} classes but the network being "
            f"fine-tuned has {num_outputs(student)}; name the network it was pruned from"
        )
    return Teacher(model, weight, temperature)

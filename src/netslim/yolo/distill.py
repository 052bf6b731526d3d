"""netslim's distillation term for a YOLO: the student's head outputs against the teacher's.

Ultralytics' own distillation (``distill_model=``, the default ``--distill-term features``)
matches the features entering the Detect head through a trained projector. This term
(``--distill-term outputs``) matches what the head outputs, where a pruned student and its
unpruned teacher have the same shapes (the same anchors, classes and box bins), so it needs
no projector:

* **classes**: binary cross-entropy of the student's class logits against the teacher's
  probabilities, both softened by the temperature T, summed and divided by the teacher's
  total score (as Ultralytics normalises its class loss by the target scores);
* **boxes**: at every anchor, KL divergence of the student's distribution over each side's
  ``reg_max`` bins (DFL) from the teacher's, softened by T and scaled by T², weighted by the
  teacher's highest class score there (the anchors that hold an object) and normalised the
  same way;
* **mask coefficients** (segmentation): their squared error, weighted and normalised alike.

Each part is normalised by the teacher's score mass as Ultralytics normalises its class loss
by the target scores; the trainer multiplies the sum by the batch size, as it does its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT = 1.0  # --distill-weight's default for this term (Ultralytics' dis= weighs its own)
TEMPERATURE = 1.0  # sigmoid and DFL outputs are already soft; T > 1 flattens them further


def outputs_loss(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """The term for one batch of head outputs (``{"boxes": (B, 4 * reg_max, A), "scores":
    (B, classes, A)[, "mask_coefficient": (B, M, A)]}``, Ultralytics' training outputs); see
    the module docs."""
    t = float(temperature)
    s_scores, t_scores = student["scores"].float(), teacher["scores"].float()
    target = torch.sigmoid(t_scores / t)
    mass = target.sum().clamp(min=1.0)
    classes = F.binary_cross_entropy_with_logits(s_scores / t, target, reduction="sum") / mass
    b, sides, anchors = student["boxes"].shape
    bins = sides // 4
    s_box = student["boxes"].float().view(b, 4, bins, anchors)
    t_box = teacher["boxes"].float().view(b, 4, bins, anchors)
    kl = F.kl_div(
        F.log_softmax(s_box / t, dim=2),
        F.log_softmax(t_box / t, dim=2),
        reduction="none",
        log_target=True,
    ).sum(dim=(1, 2))  # (B, A)
    weight = target.max(dim=1).values  # (B, A): how surely the teacher sees an object there
    boxes = (kl * weight).sum() * (t * t) / weight.sum().clamp(min=1.0)
    loss = classes + boxes
    if "mask_coefficient" in student and "mask_coefficient" in teacher:
        error = (student["mask_coefficient"].float() - teacher["mask_coefficient"].float()) ** 2
        loss = loss + (error.mean(dim=1) * weight).sum() / weight.sum().clamp(min=1.0)
    return loss

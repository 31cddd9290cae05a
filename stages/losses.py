"""Token-level losses, returned as SUMS over label tokens.

The caller divides by the number of label tokens in the GLOBAL batch, so any split of a global
batch over processes and accumulation steps gives the same loss and the same gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.batches import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at t predict labels at t+1 (HF convention: labels aligned with input_ids)."""
    return logits[:, :-1, :], labels[:, 1:]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropy over label tokens, computed in float32."""
    logits, labels = shifted(logits, labels)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over label tokens of KL(teacher || student) on temperature-softened logits, x T^2.

    As ModelOpt's LMLogitsLoss (LogitsDistillationLoss: kl_div(log_softmax(s/T), softmax(t/T))
    * T^2), but summed over the vocabulary per token and restricted to label tokens, so it is
    a per-token KL like the cross entropy it is mixed with (ModelOpt's default "mean" also
    divides by the vocabulary size and counts prompt tokens).
    """
    student, shifted_labels = shifted(student_logits, labels)
    teacher, _ = shifted(teacher_logits, labels)
    mask = shifted_labels != IGNORE_INDEX
    student_logp = F.log_softmax(student[mask].float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    per_token = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    return per_token.sum() * temperature**2

"""Distillation losses: plain KD, the conditional KD that extracts an expert (L_soft + alpha * L_scale), and the
SD / UHC baselines' matching of a student over all K classes to a teacher over some of them (``cols``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def scale_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_scale: mean absolute difference of raw logits, which keeps an expert on the Oracle's logit scale."""
    return (student.float() - teacher.float()).abs().mean()


def ckd_loss(
    student: torch.Tensor, teacher_h: torch.Tensor, T: float, alpha: float, soft: bool = True, scale: bool = True
) -> torch.Tensor:
    """Conditional KD: ``teacher_h`` are the Oracle's logits restricted to the expert's classes.

    ``soft``/``scale`` switch off either term (the paper's ablation: L_soft only, L_scale only).
    """
    loss = student.new_zeros(())
    if soft:
        loss = loss + kd_loss(student, teacher_h, T)
    if scale:
        loss = loss + alpha * scale_loss(student, teacher_h)
    return loss


def padded_kd(student: torch.Tensor, teacher: torch.Tensor, cols: torch.Tensor, T: float) -> torch.Tensor:
    """SD: KL(zero-padded teacher softmax || student softmax over all classes) * T^2: a cross-entropy on ``cols``
    plus the teacher's (constant) negative entropy, kept so that a perfect student scores 0."""
    p = F.softmax(teacher.float() / T, dim=1)
    log_q = F.log_softmax(student.float() / T, dim=1)[:, cols]
    return (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(1).mean() * (T * T)


def restricted_kd(student: torch.Tensor, teacher: torch.Tensor, cols: torch.Tensor, T: float) -> torch.Tensor:
    """UHC: KD of the student's softmax restricted (renormalised) to the teacher's classes ``cols``."""
    return kd_loss(student[:, cols], teacher, T)

"""Optimizers for LoRA: Riemannian-preconditioned (scaled) AdamW and SGD, and a name-based factory.

``ScaledAdamW`` / ``ScaledSGD`` are torch's AdamW / SGD run on the preconditioned gradients
``(B^T B + reg I)^-1 g_A`` and ``g_B (A A^T + reg I)^-1`` of every LoRA pair (Zhang & Pilanci,
ICML 2024); factors are paired by name, every other trainable parameter gets the plain rule.
"""

from difflora.optim.factory import OPTIMIZER_NAMES, build_optimizer
from difflora.optim.pairing import factor_role, pair_factors, partner_name
from difflora.optim.preconditioner import DEFAULT_REG, damped_inverse, precondition_pairs
from difflora.optim.scaled_adamw import ScaledAdamW
from difflora.optim.scaled_sgd import ScaledSGD

__all__ = [
    "DEFAULT_REG",
    "OPTIMIZER_NAMES",
    "ScaledAdamW",
    "ScaledSGD",
    "build_optimizer",
    "damped_inverse",
    "factor_role",
    "pair_factors",
    "partner_name",
    "precondition_pairs",
]

"""AutoAttack (Croce & Hein, ICML 2020), standard version, natively in JAX.

The attacks are pure functions of a logits function ``x -> logits`` (a
closure over the model in inference mode), each jit-compiled and usable
alone:

* ``apgd`` (CE, DLR or targeted-DLR loss) and ``apgd_targeted`` (APGD-T);
* ``fab_attack`` (FAB-T against given targets) and ``fab_targeted``, with
  the exact box-constrained projections ``project_linf``/``project_l2``;
* ``square_attack`` (margin loss), with its schedule ``p_schedule``,
  ``square_side`` and ``square_l2_pattern``.

``autoattack`` runs the standard ensemble (APGD-CE, APGD-T, FAB-T, Square) on
the library's model function ``apply(variables, images, train)``, in
fixed-size padded chunks over all local devices, and returns an
``AutoAttackResult``. The algorithm is the one of Croce & Hein (ICML 2020)
and of the authors' release (github.com/fra31/auto-attack); FAB is from
Croce & Hein (ICML 2020, "Minimally distorted adversarial examples with a
fast adaptive boundary attack") and Square from Andriushchenko et al. (ECCV
2020). ``docs/autoattack.md`` describes the algorithm and how it was
validated.
"""

from jax_memat.attacks.autoattack._common import target_by_rank
from jax_memat.attacks.autoattack.autopgd import (
    LOSSES,
    apgd,
    apgd_checkpoints,
    apgd_halvings,
    apgd_targeted,
    dlr_loss,
    targeted_dlr_loss,
)
from jax_memat.attacks.autoattack.ensemble import (
    ATTACKS,
    STANDARD_ATTACKS,
    AutoAttackResult,
    autoattack,
)
from jax_memat.attacks.autoattack.fab import fab_attack, fab_targeted, project_l2, project_linf
from jax_memat.attacks.autoattack.square import (
    p_schedule,
    square_attack,
    square_l2_pattern,
    square_side,
)

__all__ = [
    "ATTACKS",
    "LOSSES",
    "STANDARD_ATTACKS",
    "AutoAttackResult",
    "apgd",
    "apgd_checkpoints",
    "apgd_halvings",
    "apgd_targeted",
    "autoattack",
    "dlr_loss",
    "fab_attack",
    "fab_targeted",
    "p_schedule",
    "project_l2",
    "project_linf",
    "square_attack",
    "square_l2_pattern",
    "square_side",
    "target_by_rank",
    "targeted_dlr_loss",
]

"""Natural and adversarial accuracy with per-example results.

``make_eval_fn`` builds one jitted function for a set of attacks;
``evaluate`` walks a device-resident dataset in fixed-shape batches with it.

Example:
  >>> from jax_memat.evaluation import evaluate, make_eval_fn
  >>> eval_fn = make_eval_fn(apply_fn, {"pgd": AttackSpec("pgd", 0.1, 0.025, 20)}, mesh)
  >>> per_example, summary = evaluate(eval_fn, variables, images, labels,
  ...                                 batch_size=256, key=key, mesh=mesh)
"""

from jax_memat.evaluation.core import EvalFn, evaluate, make_eval_fn

__all__ = ["EvalFn", "evaluate", "make_eval_fn"]

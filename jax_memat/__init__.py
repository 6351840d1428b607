"""jax_memat: memorization in adversarial training, in JAX/Flax.

A functional reimplementation and extension of Dong et al., *Exploring
Memorization in Adversarial Training* (ICLR 2022). Subpackages, in dependency
order: ``data`` and ``models`` -> ``attacks`` -> ``objectives`` -> ``training``;
``analysis`` reads all of them. Nothing here parses flags or holds global state.
"""

__version__ = "0.1.0"

"""Shared by the tests: a tiny 2-layer MLP in plain JAX, and float32's unit roundoff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_memat.attacks import cross_entropy

# The spacing of float32 numbers at 1.0 (2^-23). One rounding of a value of
# magnitude m is at most F32_EPS * m / 2, so tolerances of float32 results are
# written as a count of such roundings times the size of the values involved.
F32_EPS = float(np.finfo(np.float32).eps)


def mlp_apply(variables, images, train):
    """``apply`` of a ReLU MLP; no batch-dependent layers, so ``train`` is ignored."""
    del train
    p = variables["params"]
    h = jax.nn.relu(images.reshape(images.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"], {}


def train_mlp(x, y, num_classes, *, seed, hidden=32, steps=300, learning_rate=1e-2):
    """Variables of an MLP trained with ``steps`` full-batch Adam steps on ``(x, y)``."""
    dim = int(np.prod(x.shape[1:]))
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(dim, hidden)) / np.sqrt(dim),
        "b1": np.zeros(hidden),
        "w2": rng.normal(size=(hidden, num_classes)) / np.sqrt(hidden),
        "b2": np.zeros(num_classes),
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    opt = optax.adam(learning_rate)

    def loss(params):
        return jnp.mean(cross_entropy(mlp_apply({"params": params}, x, True)[0], y))

    @jax.jit
    def train(params):
        def body(carry, _):
            params, state = carry
            updates, state = opt.update(jax.grad(loss)(params), state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[0][0]

    return {"params": train(params)}


class StopAtStep(Exception):
    """Raised by ``stop_at_step``'s hook: stands for a crash at a known step."""


def stop_at_step(step_to_stop):
    """A training hook that raises ``StopAtStep`` after step ``step_to_stop``."""

    def hook(step, state, metrics, per_example):
        if step == step_to_stop:
            raise StopAtStep

    return hook

"""Progress callbacks count finished work: evaluation batches and AutoAttack chunks."""

import jax
import numpy as np
import pytest

from jax_memat.attacks.autoattack import autoattack
from jax_memat.data import load_dataset
from jax_memat.evaluation import evaluate, make_eval_fn
from jax_memat.models import get_model, make_apply_fn
from jax_memat.training import create_train_state, make_mesh, make_optimizer, replicate
from tests.helpers import mlp_apply, train_mlp


def test_evaluate_progress_counts_finished_batches_with_one_in_flight():
    mesh = make_mesh()
    data = load_dataset("synthetic", "test", num_examples=70, image_shape=(8, 8, 1), num_classes=4)
    module = get_model("small_cnn", 4)
    state = create_train_state(
        module, jax.random.key(0), (8, 8, 1), make_optimizer("sgd", 0.1), mesh
    )
    eval_fn = make_eval_fn(make_apply_fn(module), {}, mesh)
    dispatched, calls = [], []

    def counting_eval_fn(*args):
        out = eval_fn(*args)
        dispatched.append(out)
        return out

    def progress(done):
        # What was dispatched when `done` batches were reported, and whether the
        # reported batches' results exist (is_ready: computed, nothing pending).
        ready = all(a.is_ready() for out in dispatched[:done] for a in jax.tree.leaves(out))
        calls.append((done, len(dispatched), ready))

    images, labels = replicate((data.images, data.labels), mesh)
    per_example, summary = evaluate(
        counting_eval_fn,
        state.variables,
        images,
        labels,
        batch_size=16,
        key=jax.random.key(1),
        mesh=mesh,
        num_examples=70,
        progress=progress,
    )
    num_batches = 5  # ceil(70 / 16)
    assert [done for done, _, _ in calls] == list(range(1, num_batches + 1))
    assert all(ready for _, _, ready in calls)
    # One batch ahead at most: batch k + 1 is queued while batch k is fetched.
    assert [d for _, d, _ in calls] == [2, 3, 4, 5, 5]
    np.testing.assert_array_equal(per_example["index"], np.arange(70))
    assert set(summary) == {"natural_accuracy", "natural_loss"}


SHAPE, K = (6, 6, 2), 10


@pytest.fixture(scope="module")
def model():
    """An MLP trained a little on synthetic 10-class data, and 40 test points."""
    rng = np.random.default_rng(0)
    means = rng.uniform(0.3, 0.7, (K, *SHAPE))
    y = rng.integers(0, K, 296)
    x = np.clip(means[y] + 0.25 * rng.normal(size=(296, *SHAPE)), 0, 1).astype(np.float32)
    variables = train_mlp(x[:256], y[:256], K, seed=1, steps=100)
    return variables, x[256:], y[256:].astype(np.int32)


@pytest.mark.parametrize("eps", [0.02, 0.3], ids=["few_broken", "all_broken"])
def test_autoattack_progress_counts_chunks_up_to_a_falling_total(model, eps):
    variables, x, y = model
    calls = []
    result = autoattack(
        mlp_apply,
        variables,
        x,
        y,
        eps=eps,
        norm="linf",
        key=jax.random.key(0),
        mesh=make_mesh(),
        chunk_size=16,  # 40 points: 3 chunks while all are robust
        version="custom",
        n_iter=5,
        n_queries=20,
        n_target_classes=3,
        progress=lambda *args: calls.append(args),
    )
    names = list(dict.fromkeys(name for name, *_ in calls))
    assert names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    chunks_at_start = -(-int(round(result.clean_accuracy * len(y))) // 16)
    stages = {"apgd-ce": 1, "apgd-t": 3, "fab-t": 3, "square": 1}
    previous_robust = result.clean_accuracy
    for name in names:
        mine = [c[1:] for c in calls if c[0] == name]
        done = [d for d, _, _ in mine]
        totals = [t for _, t, _ in mine]
        robust = [r for _, _, r in mine]
        # 0, 1, 2, ... up to the total, which only falls, one call per chunk.
        assert done == list(range(len(done)))
        assert all(a >= b for a, b in zip(totals, totals[1:], strict=False))
        assert done[-1] == totals[-1]
        assert all(d <= t for d, t in zip(done, totals, strict=True))
        # The robust fraction never rises and ends at the attack's result.
        assert all(a >= b for a, b in zip([previous_robust, *robust], robust, strict=False))
        assert robust[-1] == result.accuracy[name]
        previous_robust = robust[-1]
        if name == "apgd-ce":
            # Nothing broken before it: its first estimate is exact.
            assert totals[0] == done[-1] == stages[name] * chunks_at_start
    if eps == 0.3:  # everything breaks early: the later attacks have no chunk to run
        assert result.robust_accuracy == 0.0
        assert calls[-1] == ("square", 0, 0, 0.0)
    else:
        assert result.robust_accuracy > 0.0
        assert calls[-1][1] > 0

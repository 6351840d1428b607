"""The search- and data-based complexity measures, and the correlation protocol.

Each measure is checked where its value is known: a linear classifier on
one-hot inputs (every example reads its own row of the kernel, so weight
noise acts independently per example and the accuracy under noise is a normal
CDF), quadratic losses (worst-case and average deviations in closed form),
constant-loss models (zero), a linear map (local Lipschitz constant = the sum
of its entries) and direct ``jax.grad`` / O(n^2) counts.
"""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat.analysis.complexity import correlation, flatness, input_space, perturb, sharpness
from jax_memat.attacks import AttackSpec, cross_entropy, make_attack
from jax_memat.parallel import make_mesh
from tests.helpers import F32_EPS

N = 512  # examples of the one-hot problem; a multiple of the 8 simulated devices
BATCH = 128


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def linear_apply(variables, images, train):
    del train
    return images.reshape(images.shape[0], -1) @ variables["params"]["dense"]["kernel"], {}


def one_hot_problem(a, n=N, seed=0):
    """One-hot inputs e_i, labels y_i, kernel row i = a * (+1 on y_i, -1 on the other class).

    Under kernel noise u, example i is correct iff 2a + u[i, y_i] - u[i, 1 - y_i] > 0,
    independently of the other rows: with u ~ N(0, s^2) the accuracy is Phi(sqrt(2) a / s).
    """
    y = np.random.default_rng(seed).integers(0, 2, n)
    x = np.eye(n, dtype=np.float32).reshape(n, 1, 1, n)
    kernel = a * (2.0 * np.eye(2, dtype=np.float32)[y] - 1.0)
    return x, y, {"params": {"dense": {"kernel": jnp.asarray(kernel)}}}


def constant_apply(variables, images, train):
    """Logits that depend on the input but not on the parameters: a constant loss in w."""
    del train
    x = images.reshape(images.shape[0], -1)
    p = variables["params"]["dense"]["kernel"]
    return x[:, :2] * 3.0 - 1.0 + 0.0 * jnp.sum(p), {}


def _never_called(*args, **kwargs):
    pytest.fail("the model ran: arguments must be checked before anything compiles")


# --------------------------------------------------------------------------- perturb


def test_perturbation_sets_select_conv_dense_and_leave_normalization_alone():
    params = {
        "conv1": {"kernel": jnp.ones((3, 3, 1, 4))},
        "bn1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "fc": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }
    assert perturb.perturbation_mask(params, "all") == {
        "conv1": {"kernel": True},
        "bn1": {"scale": True, "bias": True},
        "fc": {"kernel": True, "bias": True},
    }
    assert perturb.perturbation_mask(params, "weights") == {
        "conv1": {"kernel": True},
        "bn1": {"scale": False, "bias": False},
        "fc": {"kernel": True, "bias": True},
    }
    assert perturb.perturbation_mask(params, "filter_normalized") == {
        "conv1": {"kernel": True},
        "bn1": {"scale": False, "bias": False},
        "fc": {"kernel": True, "bias": False},
    }
    with pytest.raises(ValueError, match=r"which='bn'.*accepted: \('all', 'weights'"):
        perturb.perturbation_mask(params, "bn")


def test_filter_normalized_direction_matches_each_filter_norm_and_zeroes_1d():
    key = jax.random.key(0)
    params = {
        "conv": {"kernel": jax.random.normal(key, (3, 3, 2, 5)) * jnp.arange(1, 6.0)},
        "fc": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.ones(3)},
    }
    mask = perturb.perturbation_mask(params, "filter_normalized")
    d = perturb.filter_normalize(perturb.gaussian_direction(key, params, mask), params, mask)
    for name in ("conv", "fc"):
        w, v = params[name]["kernel"], d[name]["kernel"]
        axes = tuple(range(w.ndim - 1))
        np.testing.assert_allclose(
            jnp.linalg.norm(v.reshape(-1, w.shape[-1]), axis=0),
            jnp.sqrt(jnp.sum(w**2, axis=axes)),
            rtol=64 * F32_EPS,
        )
    np.testing.assert_array_equal(d["fc"]["bias"], 0.0)


# --------------------------------------------------------------------------- bisection


def test_bisection_keeps_its_invariant_and_stops_within_tolerance():
    calls = []
    result = sharpness.bisect(
        lambda s: s / 2, target=0.1, progress=lambda done, total: calls.append((done, total))
    )
    assert result.converged and not result.saturated
    # 2 -> 1 -> 0.5 -> 0.25 -> 0.125 (0.0625 < 0.1, lo) -> 0.1875 (0.094, within 0.01).
    assert result.value == 0.1875
    assert result.deviation == result.value / 2
    # Invariant: every evaluated scale below the result had deviation < target; the
    # ones above it > target (the stub is increasing).
    for scale, dev in result.history:
        assert (dev > 0.1) == (scale > result.value) or scale == result.value
    # One call per evaluation, then one saying done, since the search stopped early.
    assert [d for d, _ in calls] == [*range(1, len(result.history) + 1), 16]
    assert all(t == 16 for _, t in calls)


def test_bisection_reports_saturation_at_the_upper_end():
    calls = []
    result = sharpness.bisect(
        lambda s: 0.01 * s, target=0.1, upper=2.0, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 16), (16, 16)]
    assert result.saturated and not result.converged
    assert result.value == 2.0 and result.history == ((2.0, 0.02),)


# --------------------------------------------------------------------------- PAC-Bayes


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_hits_the_analytic_accuracy_drop(magnitude_aware):
    # Plain noise: accuracy Phi(sqrt(2) a / s). Magnitude-aware noise with |w_i| = a:
    # std = sqrt(s^2 a^2 + 1e-6) ~ s a, accuracy Phi(sqrt(2) / s) whatever a, so a = 3
    # (plain sigma would saturate) still finds sigma' ~ 1.10.
    a = 3.0 if magnitude_aware else 1.0
    x, y, variables = one_hot_problem(a)
    init = {"params": {"dense": {"kernel": jnp.zeros((N, 2))}}}
    r = sharpness.pac_bayes_sigma(
        linear_apply,
        variables,
        x,
        y,
        key=jax.random.key(1),
        init_variables=init,
        magnitude_aware=magnitude_aware,
        batch_size=BATCH,
    )
    s = r["sigma"]
    std = math.sqrt(s**2 * a**2 + 1e-6) if magnitude_aware else s
    analytic_drop = 1 - _phi(math.sqrt(2) * a / std)
    # The search's own drop is within its tolerance (0.01); the analytic drop differs
    # from it by Monte Carlo error: 10 samples x 512 Bernoulli(0.9), std 0.0042.
    assert r["converged"] and not r["saturated"] and r["accuracy"] == 1.0
    assert abs(r["drop"] - 0.1) <= 0.01
    assert abs(analytic_drop - 0.1) <= 0.01 + 5 * 0.0042
    assert r["inverse_sigma_sq"] == pytest.approx(1 / s**2)
    w = np.asarray(variables["params"]["dense"]["kernel"], np.float64).ravel()
    if magnitude_aware:
        expected = sharpness.pac_bayes_mag_bound(w, s, N)
        # All |w_i| equal: the log term is omega/4 log((eps^2 + (s^2+1) a^2)/(eps^2 + s^2 a^2)).
        eps2 = 1e-6
        closed = w.size / 4 * math.log((eps2 + (s**2 + 1) * a**2) / (eps2 + s**2 * a**2))
        assert expected == pytest.approx(closed + math.log(N / s) + 10, rel=1e-12)
    else:
        expected = np.sum(w**2) / (4 * s**2) + math.log(N / s) + 10
    assert r["bound_origin"] == pytest.approx(expected, rel=1e-9)
    assert r["bound_init"] == pytest.approx(r["bound_origin"], rel=1e-9)  # w0 = 0


def test_pac_bayes_sigma_reports_saturation():
    # a = 3: accuracy at sigma = 2 is Phi(2.12) = 0.983, a drop of 0.017 < 0.1.
    x, y, variables = one_hot_problem(3.0)
    r = sharpness.pac_bayes_sigma(
        linear_apply, variables, x, y, key=jax.random.key(1), batch_size=BATCH
    )
    assert r["saturated"] and r["sigma"] == 2.0 and len(r["history"]) == 1
    assert r["drop"] < 0.09
    assert "bound_init" not in r


def test_robust_pac_bayes_with_a_zero_radius_attack_is_the_clean_one():
    x, y, variables = one_hot_problem(1.0, n=256)
    kwargs = dict(key=jax.random.key(2), batch_size=BATCH, max_steps=4)
    clean = sharpness.pac_bayes_sigma(linear_apply, variables, x, y, **kwargs)
    robust = sharpness.pac_bayes_sigma(
        linear_apply,
        variables,
        x,
        y,
        inputs="adversarial",
        attack=AttackSpec("pgd", eps=0.0, step_size=0.1, steps=2),
        **kwargs,
    )
    assert robust["history"] == clean["history"]


def test_pac_bayes_on_one_device_equals_eight_devices():
    # Batches split over the 8 simulated devices, weights replicated: the same noise,
    # the same attack starts and exact accuracy counts, so the same search.
    x, y, variables = one_hot_problem(1.0, n=256)
    pgd = AttackSpec("pgd", eps=0.05, step_size=0.02, steps=2)
    kwargs = dict(key=jax.random.key(3), batch_size=BATCH, max_steps=3, inputs="adversarial")
    one = sharpness.pac_bayes_sigma(
        linear_apply, variables, x, y, attack=pgd, mesh=make_mesh(jax.devices()[:1]), **kwargs
    )
    eight = sharpness.pac_bayes_sigma(linear_apply, variables, x, y, attack=pgd, **kwargs)
    assert len(jax.devices()) == 8
    assert one["history"] == eight["history"]


# --------------------------------------------------------------------------- sharpness


@pytest.mark.parametrize("c", [1.0, 4.0])
def test_box_ascent_finds_the_worst_corner_of_a_quadratic(c):
    w_star = jnp.array([0.5, -1.0, 2.0, 0.0])
    alpha = 0.3
    loss = lambda p: c * jnp.sum((p - w_star) ** 2)
    vg = jax.value_and_grad(lambda p, k: loss(p))
    bound = sharpness.box_bound(w_star, True, alpha, magnitude_aware=False)
    u = jax.jit(lambda k: sharpness.box_ascent(vg, w_star, bound, k, steps=10))(jax.random.key(3))
    # max over |u_i| <= alpha of c ||u||^2 is at a corner: c d alpha^2.
    np.testing.assert_allclose(jnp.abs(u), alpha, rtol=4 * F32_EPS)
    np.testing.assert_allclose(loss(w_star + u) - loss(w_star), c * 4 * alpha**2, rtol=16 * F32_EPS)


def test_box_ascent_on_a_constant_loss_finds_no_deviation():
    vg = jax.value_and_grad(lambda p, k: 0.0 * jnp.sum(p) + 2.0)
    w = jnp.ones(5)
    u = sharpness.box_ascent(vg, w, jnp.full(5, 0.5), jax.random.key(0), steps=5)
    assert float(vg(w + u, None)[0] - vg(w, None)[0]) == 0.0


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_worst_case_sharpness_finds_the_flip_point_of_the_linear_model(magnitude_aware):
    # Worst case of |u| <= b per entry: margin 2a - 2b, so every example flips at b = a:
    # alpha = a (plain) or alpha a + 1e-3 = a, alpha = 1 - 1e-3 / a (magnitude-aware).
    a = 1.0
    x, y, variables = one_hot_problem(a, n=256)
    r = sharpness.worst_case_sharpness(
        linear_apply,
        variables,
        x,
        y,
        key=jax.random.key(4),
        magnitude_aware=magnitude_aware,
        batch_size=BATCH,
        restarts=2,
    )
    expected = 1 - 1e-3 / a if magnitude_aware else 1.0
    # The drop jumps from 0 to 1 at the flip: the search brackets it to 2 / 2^15.
    assert not r["saturated"] and not r["converged"]
    assert abs(r["alpha"] - expected) <= 2 * 2.0**-15
    assert r["inverse_alpha_sq"] == pytest.approx(1 / r["alpha"] ** 2)


def test_worst_case_sharpness_of_a_constant_loss_model_saturates():
    x, y, variables = one_hot_problem(1.0, n=64)
    r = sharpness.worst_case_sharpness(
        constant_apply, variables, x, y, key=jax.random.key(0), batch_size=64, ascent_steps=2
    )
    assert r["saturated"] and r["drop"] == 0.0 and r["alpha"] == 2.0


# --------------------------------------------------------------------------- flatness


@pytest.mark.parametrize("c", [1.0, 4.0])
def test_average_and_worst_flatness_of_a_quadratic_scale_with_curvature(c):
    w_star = {"a": jnp.array([1.0, -2.0, 2.0]), "b": jnp.array([[0.5, 0.5], [0.5, -0.5]])}
    xi = 0.2
    mask = {"a": True, "b": True}

    def loss(p):
        return c * sum(jnp.sum((p[k] - w_star[k]) ** 2) for k in p)

    # ||nu_l|| = xi ||w_l|| on the sphere (and at the end of the ascent, which is
    # pushed to the sphere by the outward gradient): deviation c xi^2 ||w||^2 = 9 c xi^2 + c xi^2.
    expected = c * xi**2 * (9.0 + 1.0)
    dev, base = flatness.sphere_deviation(loss, w_star, mask, xi, jax.random.key(5), num_samples=7)
    assert float(base) == 0.0
    np.testing.assert_allclose(dev, expected, rtol=32 * F32_EPS)
    vg = jax.value_and_grad(lambda p, k: loss(p))
    nu = flatness.ball_ascent(vg, w_star, mask, xi, jax.random.key(6), steps=20)
    moved = jax.tree.map(jnp.add, w_star, nu)
    np.testing.assert_allclose(loss(moved), expected, rtol=32 * F32_EPS)


def test_robust_flatness_of_a_constant_loss_model_is_zero():
    x, y, variables = one_hot_problem(1.0, n=64)
    pgd = AttackSpec("pgd", eps=0.1, step_size=0.05, steps=3)
    ticks = []
    avg = flatness.average_robust_flatness(
        constant_apply,
        variables,
        x,
        y,
        attack=pgd,
        key=jax.random.key(0),
        num_samples=3,
        batch_size=64,
        progress=lambda d, t: ticks.append((d, t)),
    )
    assert avg["flatness"] == 0.0 and avg["deviations"] == [0.0] * 3 and avg["rce"] > 0
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    worst = flatness.worst_case_robust_flatness(
        constant_apply, variables, x, y, attack=pgd, key=jax.random.key(0), steps=3, batch_size=64
    )
    assert worst["flatness"] == 0.0
    assert 0 < worst["relative_norm"] <= 0.003 * (1 + 8 * F32_EPS)


def test_robust_flatness_of_the_linear_model_grows_with_the_radius():
    x, y, variables = one_hot_problem(1.0, n=64)
    pgd = AttackSpec("pgd", eps=0.02, step_size=0.01, steps=2)
    kw = dict(attack=pgd, key=jax.random.key(0), batch_size=64, steps=5)
    small = flatness.worst_case_robust_flatness(linear_apply, variables, x, y, xi=0.05, **kw)
    large = flatness.worst_case_robust_flatness(linear_apply, variables, x, y, xi=0.2, **kw)
    assert 0 < small["flatness"] < large["flatness"]
    assert large["relative_norm"] == pytest.approx(0.2, rel=64 * F32_EPS)


# --------------------------------------------------------------------------- landscape


def test_landscape_at_zero_is_the_unperturbed_robust_loss_and_the_plot_is_written(tmp_path):
    x, y, variables = one_hot_problem(1.0, n=64)
    pgd = AttackSpec("pgd", eps=0.05, step_size=0.02, steps=3, random_start=False)
    alphas = (-0.2, 0.0, 0.1, 0.2)
    land = flatness.weight_loss_landscape(
        linear_apply,
        variables,
        x,
        y,
        attack=pgd,
        key=jax.random.key(0),
        alphas=alphas,
        a0=0.2,
        batch_size=64,
    )
    attack = make_attack(pgd)
    x_adv = attack(linear_apply, variables, jnp.asarray(x), jnp.asarray(y), None)
    direct = float(jnp.mean(cross_entropy(linear_apply(variables, x_adv, False)[0], y)))
    for name in ("random", "adversarial"):
        assert len(land[name]) == len(alphas)
        assert land[name][1] == pytest.approx(direct, rel=64 * F32_EPS)
        assert land[f"{name}_summary"] == land[name][3] - land[name][1]
    # Along the loss gradient the robust loss rises.
    assert land["adversarial"][2] > land["adversarial"][1]
    assert land["rce"] == land["random"][1]
    path = str(tmp_path / "landscape.png")
    assert flatness.plot_weight_loss_landscape(land, path) == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["landscape.png"]


# --------------------------------------------------------------------------- input space


def test_local_lipschitz_of_a_positive_linear_map_is_the_sum_of_its_entries():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, (6, 3)).astype(np.float32)  # f(x) = x @ A, d = 6 inputs
    variables = {"params": {"dense": {"kernel": jnp.asarray(a)}}}
    x = rng.uniform(0.3, 0.7, (16, 1, 1, 6)).astype(np.float32)
    eps, step_size = 0.2, 0.004
    r = input_space.local_lipschitz(
        linear_apply,
        variables,
        x,
        eps=eps,
        key=jax.random.key(0),
        steps=100,
        step_size=step_size,
        batch_size=8,
    )
    # max over the L-inf ball of ||A^T d||_1 / ||d||_inf = sum(A), at d = t * ones. The
    # denominator's subgradient pushes the largest coordinate down while the numerator's
    # pushes every coordinate up, so sign ascent ends oscillating around d = t * ones,
    # each coordinate within about one step of the largest: a relative shortfall of at
    # most ~ step_size / eps.
    total = float(np.sum(a))
    assert r["per_example"].shape == (16,)
    assert np.all(r["per_example"] <= total * (1 + 64 * F32_EPS))
    assert np.all(r["per_example"] >= total * (1 - step_size / eps))
    assert r["local_lipschitz"] == pytest.approx(float(np.mean(r["per_example"])))


@pytest.mark.parametrize("inputs", ["clean", "adversarial"])
def test_input_gradient_norm_matches_jax_grad_per_example(inputs):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (20, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    variables = {"params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}}
    attack = AttackSpec("pgd", eps=0.1, step_size=0.05, steps=3, random_start=False)
    r = input_space.input_gradient_norm(
        linear_apply,
        variables,
        x,
        y,
        key=jax.random.key(0),
        inputs=inputs,
        attack=attack if inputs == "adversarial" else None,
        batch_size=8,
    )
    points = jnp.asarray(x)
    if inputs == "adversarial":
        points = make_attack(attack)(linear_apply, variables, points, jnp.asarray(y), None)

    def one(xi, yi):
        logits = linear_apply(variables, xi[None], False)[0]
        return cross_entropy(logits, yi[None])[0]

    direct = [float(jnp.sum(jnp.abs(jax.grad(one)(points[i], y[i])))) for i in range(20)]
    np.testing.assert_allclose(r["per_example"], direct, rtol=64 * F32_EPS)
    assert r["input_gradient_norm"] == pytest.approx(np.mean(direct), rel=64 * F32_EPS)


# --------------------------------------------------------------------------- correlation


def _direct_tau_b(x, y):
    conc = disc = tie_x = tie_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if sx == 0:
                tie_x += 1
            if sy == 0:
                tie_y += 1
            if sx * sy > 0:
                conc += 1
            elif sx * sy < 0:
                disc += 1
    n0 = n * (n - 1) // 2
    return (conc - disc) / math.sqrt((n0 - tie_x) * (n0 - tie_y))


@pytest.mark.parametrize("seed", range(4))
def test_kendall_tau_b_with_ties_matches_a_direct_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = 9 + seed
    x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
    assert correlation.kendall_tau_b(x, y) == pytest.approx(_direct_tau_b(x, y), abs=1e-12)


def test_kendall_tau_b_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    for _ in range(5):
        x, y = rng.integers(0, 5, 15), rng.normal(size=15).round(1)
        expected = stats.kendalltau(x, y, variant="b").statistic
        assert correlation.kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_b_edge_cases():
    assert correlation.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(correlation.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="non-finite values at positions \\[1\\]"):
        correlation.kendall_tau_b([1.0, float("nan"), 2.0], [1, 2, 3])


def test_granulated_tau_on_a_two_axis_family():
    # noise axis: pgd group tau 1, trades group tau -1/3 (mart's single run: undefined)
    # -> 1/3. algo axis: noise 0 (3 runs, all concordant) 1, noise 0.5 -1, noise 1 -1
    # -> -1/3. Overall 0.
    runs = [{"algo": a, "noise": r} for a, r in itertools.product(("pgd", "trades"), (0, 0.5, 1))]
    runs.append({"algo": "mart", "noise": 0})
    measure = [1, 2, 3, 3, 1, 2, 5]
    gap = [0.1, 0.2, 0.3, 0.15, 0.25, 0.35, 0.5]
    g = correlation.granulated_tau(measure, gap, runs)
    assert g["axes"]["noise"] == {"tau": pytest.approx(1 / 3), "groups": 2, "undefined_groups": 1}
    assert g["axes"]["algo"] == {"tau": pytest.approx(-1 / 3), "groups": 3, "undefined_groups": 0}
    assert g["tau"] == pytest.approx(0.0, abs=1e-15)


def test_correlate_leaves_unconverged_runs_out_and_reports_them():
    hp = [{"noise": r} for r in (0.0, 0.5, 1.0, 1.0)]
    r = correlation.correlate(
        [1.0, 2.0, 3.0, float("nan")],
        [0.1, 0.3, 0.2, 0.9],
        converged=[True, True, True, False],
        hparams=hp,
        names=["r0", "r50", "r100", "trades_r100"],
    )
    assert r["excluded"] == ["trades_r100"] and r["ranked"] == ["r0", "r50", "r100"]
    assert r["tau_b"] == pytest.approx(1 / 3)
    assert r["granulated"]["tau"] == pytest.approx(1 / 3)
    with pytest.raises(
        ValueError, match="at least 2 ranked.*got 1 of 3.*not converged: \\['b', 'c'\\]"
    ):
        correlation.correlate([1, 2, 3], [1, 2, 3], converged=[True, False, False], names="abc")
    with pytest.raises(ValueError, match="measure is not finite for the ranked runs \\['run1'\\]"):
        correlation.correlate([1.0, float("inf"), 2.0], [1, 2, 3])
    with pytest.raises(ValueError, match="converged must be 2 booleans"):
        correlation.correlate([1, 2], [1, 2], converged=[1, 0])


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(which="bn"), "which='bn' is not a perturbation set"),
        (dict(target=1.5), "accepted 0 < target < 1"),
        (dict(target=0.0), "accepted 0 < target < 1"),
        (dict(tolerance=0.2), "tolerance must be in"),
        (dict(inputs="adversarial"), "inputs='adversarial' needs attack"),
        (dict(inputs="noisy"), "inputs='noisy'; accepted"),
        (dict(batch_size=12), "multiple of the 8 devices"),
        (dict(num_examples=0), "num_examples must be an int in \\[1, 16\\]"),
        (dict(num_samples=0), "num_samples must be an int >= 1"),
    ],
)
def test_pac_bayes_bad_arguments_fail_before_the_model_runs(kwargs, match):
    x = np.zeros((16, 1, 1, 2), np.float32)
    args = dict(key=jax.random.key(0), batch_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        sharpness.pac_bayes_sigma(_never_called, {"params": {}}, x, np.zeros(16, int), **args)


def test_other_measures_reject_bad_arguments_before_the_model_runs():
    x, y = np.zeros((16, 1, 1, 2), np.float32), np.zeros(16, int)
    v = {"params": {"dense": {"kernel": jnp.zeros((2, 2))}}}
    key = jax.random.key(0)
    pgd = AttackSpec("pgd", eps=0.1, step_size=0.05, steps=1)
    with pytest.raises(ValueError, match="float array"):
        sharpness.worst_case_sharpness(_never_called, v, x.astype(np.uint8), y, key=key)
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        sharpness.worst_case_sharpness(_never_called, v, x, y, key=key, restarts=0)
    with pytest.raises(ValueError, match="robust cross-entropy needs attack"):
        flatness.average_robust_flatness(_never_called, v, x, y, attack=None, key=key)
    with pytest.raises(ValueError, match="xi must be a finite number > 0"):
        flatness.worst_case_robust_flatness(_never_called, v, x, y, attack=pgd, key=key, xi=-1.0)
    with pytest.raises(ValueError, match="alphas must contain 0"):
        flatness.weight_loss_landscape(_never_called, v, x, y, attack=pgd, key=key, alphas=[1.0])
    with pytest.raises(ValueError, match="a0=0.3 must be one of alphas"):
        flatness.weight_loss_landscape(
            _never_called, v, x, y, attack=pgd, key=key, a0=0.3, alphas=[0.0, 0.5]
        )
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        input_space.local_lipschitz(_never_called, v, x, eps=0.0, key=key)
    with pytest.raises(ValueError, match="attack is only used with inputs='adversarial'"):
        input_space.input_gradient_norm(_never_called, v, x, y, key=key, attack=pgd)

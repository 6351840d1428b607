"""Sanity tests of the PyTorch baseline: ``pytest benchmarks/test_torch_baseline.py``.

Kept beside the baseline (not under tests/) because torch is an optional
``bench`` dependency; the module is skipped where torch is not installed.
"""

import pytest

torch = pytest.importorskip("torch")

import torch_baseline as tb  # noqa: E402 (after the importorskip guard)

EPS = 8 / 255


@pytest.fixture(params=["preact_resnet18", "resnet18"])
def model(request):
    torch.manual_seed(0)
    return tb.get_model(request.param)


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_parameter_counts():
    # PreAct: 11,171,146 for the trunk + 1,024 for the final BatchNorm.
    assert sum(p.numel() for p in tb.PreActResNet18().parameters()) == 11_172_170
    assert sum(p.numel() for p in tb.ResNet18().parameters()) == 11_173_962


def test_pgd_stays_in_ball_and_box_and_increases_loss(model):
    x, y = _batch(4)
    model.eval()
    x_adv = tb.pgd_linf(model, x, y, steps=5)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # Only the input is differentiated: parameter gradients stay unset.
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(model(x_adv), y) > ce(model(x), y)


def test_step_modes_and_loss_decreases_on_repeated_batch(model):
    x, y = _batch(4)
    opt = tb.make_sgd(model, lr=0.01)
    losses = [tb.pgd_at_step(model, opt, x, y, steps=2).item() for _ in range(3)]
    assert model.training  # left in train mode, as the conventional loop expects
    assert losses[-1] < losses[0]


def test_bf16_autocast_step_runs(model):
    x, y = _batch(4)
    opt = tb.make_sgd(model)
    loss = tb.pgd_at_step(model, opt, x, y, steps=1, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_small_cnn_matches_jax_memat_parameter_count_and_shape():
    net = tb.get_model("small_cnn")
    assert sum(p.numel() for p in net.parameters()) == 151_402  # jax_memat small_cnn's count
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_prepare_refuses_unknown_variant():
    with pytest.raises(ValueError, match="accepted: eager, channels_last, compile"):
        tb.prepare(tb.get_model("small_cnn"), torch.rand(2, 1, 28, 28), "nhwc")


def _two_steps(variant, x, y):
    """The model, batch and losses of two PGD-AT steps of one baseline variant, seeded alike."""
    torch.manual_seed(0)
    model, xv = tb.prepare(tb.get_model("small_cnn"), x.clone(), variant)
    opt = tb.make_sgd(model, lr=0.01)
    torch.manual_seed(1)  # the same random start
    return model, xv, [tb.pgd_at_step(model, opt, xv, y, steps=2).item() for _ in range(2)]


def test_channels_last_variant_computes_the_same_step():
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    _, _, eager = _two_steps("eager", x, y)
    model, xv, channels_last = _two_steps("channels_last", x, y)
    assert xv.is_contiguous(memory_format=torch.channels_last)
    assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    # Same math in another memory order: float32 sums in another order, a few ulps of a
    # loss of about 2.3 over two steps.
    assert channels_last == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_compile_variant_runs_and_matches_eager():
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    _, _, eager = _two_steps("eager", x, y)
    _, _, compiled = _two_steps("compile", x, y)
    # Inductor fuses and reorders float32 work: looser than channels_last's bound.
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_robust_eval_is_the_per_batch_loop():
    torch.manual_seed(0)
    model = tb.get_model("small_cnn")
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    torch.manual_seed(5)
    natural, robust = tb.robust_eval(model, x, y, batch_size=4, steps=3)
    assert not model.training and natural.shape == robust.shape == (10,)
    # The same attack by hand, batch by batch (4, 4, 2), from the same random state.
    torch.manual_seed(5)
    by_hand = []
    for start in (0, 4, 8):
        xb, yb = x[start : start + 4], y[start : start + 4]
        x_adv = tb.pgd_linf(model, xb, yb, steps=3)
        with torch.no_grad():
            by_hand.append(model(x_adv).argmax(1) == yb)
    assert torch.equal(robust, torch.cat(by_hand))
    with torch.no_grad():
        assert torch.equal(natural, model(x).argmax(1) == y)
    with pytest.raises(ValueError, match="batch_size"):
        tb.robust_eval(model, x, y, batch_size=0)


def test_scaled_logits_is_the_affine_map_and_follows_eval():
    torch.manual_seed(0)
    net = tb.get_model("small_cnn")
    offset = torch.zeros(10)
    offset[0] = 100.0
    wrapped = tb.ScaledLogits(net, 1e-3, offset).eval()
    assert not net.training  # eval() reaches the wrapped model
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        # Same float32 operations in the same order: equal bit for bit.
        assert torch.equal(wrapped(x), 1e-3 * net(x) + offset)
        assert (wrapped(x).argmax(1) == 0).all()

"""A plain PyTorch PGD-AT training step, the baseline jax_memat is measured against.

Written the way adversarial-training code is conventionally written in PyTorch
(Madry et al.; Rice et al.; the authors' release of Dong et al., ICLR 2022):
eager mode, NCHW, ``model.eval()`` while crafting the attack with autograd on the
input, ``model.train()`` for the update, ``torch.optim.SGD``. Nothing here is tuned
for speed beyond ``cudnn.benchmark``, which such code habitually turns on.

The models are the CIFAR variants (3x3 stem with stride 1, no max-pool,
``[2, 2, 2, 2]`` blocks of widths 64..512, global average pooling, linear head):

- ``PreActResNet18``: pre-activation blocks (He et al., 2016) with a final
  BatchNorm + ReLU before pooling, as in the robust-overfitting code of Rice et al.
- ``ResNet18``: post-activation ``BasicBlock``s with 1x1 projection shortcuts.
- ``SmallCNN``: jax_memat's ``small_cnn`` (the quickstart's model, 28x28x1):
  two 3x3 stride-2 convolutions (32, 64 channels) with BatchNorm and ReLU, a
  2x2 max pool, a 128-unit hidden layer and a linear head.

Besides that conventional step (variant ``eager``), ``prepare`` sets up what a
performance-aware PyTorch user adds: ``channels_last`` (the model and the batch
in NHWC memory order, which cuDNN's tensor-core convolutions prefer; with
``torch.autocast(bfloat16)`` in bfloat16 as in eager) and ``compile``
(``channels_last`` plus ``torch.compile`` of the model, which compiles its
forward and backward passes in both BatchNorm modes; the attack loop and the
optimizer stay eager Python).

Example::

    model = ResNet18()
    opt = make_sgd(model)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = pgd_at_step(model, opt, x, y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "PreActBlock",
    "PreActResNet18",
    "ResNet18",
    "ScaledLogits",
    "SmallCNN",
    "VARIANTS",
    "get_model",
    "make_sgd",
    "pgd_at_step",
    "pgd_linf",
    "prepare",
    "robust_eval",
]

VARIANTS = ("eager", "channels_last", "compile")


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input (He et al., 2016).
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _CifarResNet(nn.Module):
    """Shared trunk: 3x3 stride-1 stem, four stages, global average pool, linear."""

    def __init__(self, block: type[nn.Module], num_blocks, num_classes: int, preact: bool):
        super().__init__()
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        # Post-activation nets normalise right after the stem; pre-activation nets
        # normalise once more after the last block instead.
        self.bn = nn.BatchNorm2d(512 if preact else 64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def PreActResNet18(num_classes: int = 10) -> nn.Module:
    """CIFAR PreActResNet-18 (11.2M parameters for 10 classes)."""
    return _CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, preact=True)


def ResNet18(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-18 (11.2M parameters for 10 classes)."""
    return _CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, preact=False)


class SmallCNN(nn.Module):
    """jax_memat's ``small_cnn`` on 28x28x1 (151,402 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        # 28 -> 14 -> 7 -> 4: Flax's "SAME" max pool pads the odd side, as ceil_mode does.
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.linear = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.linear(F.relu(self.fc1(x.flatten(1))))


class ScaledLogits(nn.Module):
    """``scale * model(x) + offset``: an affine map of a classifier's logits.

    The evaluation benchmark's ``worst_case`` mode wraps both frameworks' models
    in the same map (scale 1e-3, offset 100 on class 0, the label of every
    point) so that no attack breaks any point and every attack runs its whole
    budget at the full cost of the network's forward and backward passes.
    Submodule ``net``, so ``eval()`` and ``to()`` reach the wrapped model.

    Example::

        offset = torch.zeros(10)
        offset[0] = 100.0
        wrapped = ScaledLogits(get_model("small_cnn"), 1e-3, offset).eval()
    """

    def __init__(self, net: nn.Module, scale: float, offset: torch.Tensor):
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x) + self.offset


_MODELS = {"preact_resnet18": PreActResNet18, "resnet18": ResNet18, "small_cnn": SmallCNN}


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """Returns a fresh model by the registry names jax_memat uses."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_MODELS)}")
    return _MODELS[name](num_classes)


def prepare(
    model: nn.Module, x: torch.Tensor, variant: str = "eager"
) -> tuple[nn.Module, torch.Tensor]:
    """The model and batch as a variant of the baseline runs them (module docstring).

    Args:
      model: a model from ``get_model``, on its device.
      x: the NCHW batch.
      variant: ``eager`` (as given), ``channels_last`` or ``compile``.

    Returns:
      ``(model, x)`` to pass to ``pgd_at_step``; for ``compile`` the model is the
      ``torch.compile`` wrapper, sharing the original's parameters (build the
      optimizer from either).

    Example::

        model, x = prepare(get_model("resnet18").cuda(), x.cuda(), "compile")
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    if variant == "eager":
        return model, x
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)
    return model, x


def make_sgd(
    model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.Optimizer:
    """SGD as in the paper's TE study (weight decay on every parameter, as the authors')."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
) -> torch.Tensor:
    """L-inf PGD with a uniform random start; maximises cross-entropy.

    The caller chooses the BatchNorm mode (the step below puts the model in eval
    mode first). Gradients are taken with respect to the input only, so parameter
    ``.grad`` fields are left untouched.

    Returns:
      Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in [0, 1].
    """
    delta = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = torch.clamp(x + delta, 0.0, 1.0).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def pgd_at_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One PGD-AT training step (Madry et al.): attack in eval mode, update in train mode.

    Args:
      model: the classifier, taking NCHW images in [0, 1] (no normalisation layer).
      opt: its optimizer (see ``make_sgd``).
      x: images, float32 [B, 3, H, W] in [0, 1], on the model's device.
      y: integer labels [B].
      eps, alpha, steps: L-inf radius, step size and number of PGD steps.
      autocast_dtype: if set (e.g. ``torch.bfloat16``), run forward passes under
        ``torch.autocast`` -- the conventional PyTorch mixed precision; parameters
        and the update stay float32.

    Returns:
      The mean training loss on the adversarial batch, as a detached device tensor
      (no ``.item()``, so the step does not force a host sync).
    """
    enabled = autocast_dtype is not None
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=enabled):
        model.eval()
        x_adv = pgd_linf(model, x, y, eps=eps, alpha=alpha, steps=steps)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def robust_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural and PGD accuracy per example, the evaluation loop of PGD-AT code.

    As robust-overfitting and PGD-AT evaluation scripts do it: ``model.eval()``,
    then per batch a clean forward, ``pgd_linf`` (uniform random start, ``steps``
    sign steps of ``alpha``, projection on the ``eps``-ball and ``[0, 1]``) and a
    forward on the adversarial batch, both forwards under ``torch.no_grad()``.
    The last batch may be smaller. Results stay on the device (no host sync
    per batch).

    Args:
      model: the classifier (NCHW images in [0, 1]).
      x: all images, float32 ``[N, C, H, W]`` on the model's device.
      y: integer labels ``[N]``.
      batch_size: examples per batch.
      eps, alpha, steps: the attack (PGD-20 at 8/255 with steps of 2/255 by default).

    Returns:
      ``(natural_correct, robust_correct)``, bool ``[N]`` device tensors.

    Example::

        natural, robust = robust_eval(model, x, y, batch_size=128)
        robust.float().mean().item()
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    natural, robust = [], []
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with torch.no_grad():
            natural.append(model(xb).argmax(1) == yb)
        x_adv = pgd_linf(model, xb, yb, eps=eps, alpha=alpha, steps=steps)
        with torch.no_grad():
            robust.append(model(x_adv).argmax(1) == yb)
    return torch.cat(natural), torch.cat(robust)

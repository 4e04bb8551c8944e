"""Reference models: AlexNet (one stream), plain deep CNNs and MLPs, a small ResNet.

Weights come from PyTorch's default init; use :mod:`signalprop.init` to set a scheme.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._errors import SignalpropError
from .theory import ActLike

_ACT_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "selu": nn.SELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "celu": nn.CELU,
    "hardtanh": nn.Hardtanh,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # type: ignore[dict-item]
    "relu6": nn.ReLU6,
    "softsign": nn.Softsign,
    "hardswish": nn.Hardswish,
    "linear": nn.Identity,
    "identity": nn.Identity,
}


def make_activation(act: ActLike) -> nn.Module:
    """A fresh activation module from a name (``"relu"``, ``"tanh"``, ...) or a copy of a module instance.

    Args:
        act: A name (``"relu"``, ``"gelu_tanh"``, ...; with parameters as :func:`signalprop.theory.parse_name`
            reads them: ``"leaky_relu(0.2)"``, ``"elu(0.5)"``, ``"softplus(2, 5)"``), or an ``nn.Module``
            to copy.

    Returns:
        A new module, so that layers built with it do not share one instance.

    Raises:
        SignalpropError: ``act`` is neither a known plain name nor a module.

    Examples:
        >>> make_activation("leaky_relu"), make_activation(nn.LeakyReLU(0.2))
        (LeakyReLU(negative_slope=0.01), LeakyReLU(negative_slope=0.2))
        >>> make_activation("leaky_relu(0.2)"), make_activation("hardtanh(max_val=2)")
        (LeakyReLU(negative_slope=0.2), Hardtanh(min_val=-1.0, max_val=2.0))
    """
    if isinstance(act, nn.Module):
        import copy

        return copy.deepcopy(act)
    if isinstance(act, str):
        from .activations import parse_name

        try:
            key, params = parse_name(act)
        except SignalpropError:
            key, params = act, None
        if key in _ACT_MODULES:
            return _ACT_MODULES[key](*(params or ()))
    raise SignalpropError(
        f"cannot build an activation module from {act!r}; use one of {', '.join(sorted(_ACT_MODULES))} "
        "or pass an nn.Module instance such as nn.LeakyReLU(0.2)"
    )


def _check_positive(**kw: int) -> None:
    for name, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise SignalpropError(f"{name} must be a positive integer, got {v!r}")


def alexnet(num_classes: int = 1000, *, dropout: float = 0.5, in_channels: int = 3) -> nn.Sequential:
    """AlexNet (Krizhevsky et al. 2012), one stream: 5 conv + 3 fully connected layers, ReLU, max-pooling.

    Input 3x224x224. Channel counts are the two GPU streams merged (96, 256, 384, 384, 256); local
    response normalization is left out, as in most modern re-implementations. Module names are
    ``features.<i>`` and ``classifier.<i>`` as in torchvision.

    Args:
        num_classes: Outputs of the last Linear layer.
        dropout: Dropout probability before the first two Linear layers.
        in_channels: Input channels.

    Returns:
        The model, named stages ``features``, ``flatten``, ``classifier``.

    Raises:
        SignalpropError: ``num_classes`` or ``in_channels`` is not a positive integer.

    Examples:
        >>> import torch
        >>> with torch.device("meta"):  # 62 M parameters: build without allocating them
        ...     net = alexnet()
        >>> sum(p.numel() for p in net.parameters()), net.classifier[-1].out_features
        (62378344, 1000)
    """
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    classifier = nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes),
    )
    return nn.Sequential(
        _named(
            features=features,
            flatten=nn.Flatten(),
            classifier=classifier,
        )
    )


def _named(**modules: nn.Module) -> OrderedDict[str, nn.Module]:
    return OrderedDict(modules)


def plain_cnn(
    depth: int = 30,
    width: int = 32,
    act: ActLike = "relu",
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    kernel_size: int = 3,
    bias: bool = True,
) -> nn.Sequential:
    """A plain (no normalization, no skip) CNN of ``depth`` conv layers of ``width`` channels, then a head.

    Conv(3x3, same padding) -> act, repeated; global average pooling, flatten, Linear to ``num_classes``.
    The body keeps the spatial size, so He's product formula applies layer by layer. Names are
    ``body.<i>`` and ``head.<i>``.

    Args:
        depth: Conv layers in the body.
        width: Channels of every body conv.
        act: The activation after each conv (:func:`make_activation`).
        in_channels: Input channels.
        num_classes: Outputs of the head.
        kernel_size: Odd kernel size of the body convs.
        bias: Whether the body convs have a bias.

    Returns:
        The model.

    Raises:
        SignalpropError: ``depth``, ``width``, ``in_channels`` or ``num_classes`` is not a positive integer.

    Examples:
        >>> import torch
        >>> net = plain_cnn(depth=4, width=8)
        >>> len(net.body), net(torch.zeros(2, 3, 8, 8)).shape
        (8, torch.Size([2, 10]))
    """
    _check_positive(depth=depth, width=width, in_channels=in_channels, num_classes=num_classes)
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, kernel_size, padding=kernel_size // 2, bias=bias), make_activation(act)]
        c = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return nn.Sequential(_named(body=nn.Sequential(*layers), head=head))


def mlp(
    depth: int = 10,
    width: int = 256,
    act: ActLike = "relu",
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    bias: bool = True,
) -> nn.Sequential:
    """A plain MLP: ``depth`` hidden Linear layers of ``width`` units, each followed by ``act``, then a Linear.

    ``in_features`` defaults to ``width``; ``out_features`` to ``width`` (so the net maps R^width to itself).
    Module indices follow ``nn.Sequential``: Linear at even positions, activations at odd ones.

    Args:
        depth: Hidden Linear layers.
        width: Units of each hidden layer.
        act: The activation after each hidden layer (:func:`make_activation`).
        in_features: Input features.
        out_features: Outputs of the last Linear layer.
        bias: Whether the Linear layers have a bias.

    Returns:
        The model, ``2 * depth + 1`` modules.

    Raises:
        SignalpropError: A size is not a positive integer.

    Examples:
        >>> import torch
        >>> net = mlp(depth=3, width=16, act="tanh", in_features=4, out_features=2)
        >>> len(net), net[1], net(torch.zeros(5, 4)).shape
        (7, Tanh(), torch.Size([5, 2]))
    """
    _check_positive(depth=depth, width=width)
    n_in = width if in_features is None else in_features
    n_out = width if out_features is None else out_features
    _check_positive(in_features=n_in, out_features=n_out)
    layers: list[nn.Module] = []
    c = n_in
    for _ in range(depth):
        layers += [nn.Linear(c, width, bias=bias), make_activation(act)]
        c = width
    layers.append(nn.Linear(c, n_out, bias=bias))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or 1x1 projection) shortcut, then ReLU (He et al. 2016).

    Args:
        c_in: Input channels.
        c_out: Output channels; a 1x1 projection shortcut when it differs from ``c_in`` or ``stride`` > 1.
        stride: Stride of the first conv (and of the projection).
        norm: BatchNorm after each conv; without it the convs get biases.

    Examples:
        >>> import torch
        >>> block = BasicBlock(8, 16, stride=2)
        >>> block(torch.zeros(1, 8, 8, 8)).shape, type(block.shortcut).__name__
        (torch.Size([1, 16, 4, 4]), 'Conv2d')
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm)
        self.bn1: nn.Module = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not norm)
        self.bn2: nn.Module = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.relu2 = nn.ReLU()

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def resnet(
    blocks: tuple[int, ...] = (2, 2, 2),
    width: int = 16,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    norm: bool = True,
) -> nn.Sequential:
    """A small CIFAR-style ResNet (He et al. 2016): a stem conv, stages of :class:`BasicBlock`, a Linear head.

    Width doubles and the stride is 2 from the second stage on; global average pooling before the head.
    ``norm=False`` drops BatchNorm, the setting in which Fixup (Zhang et al. 2019) matters.

    Args:
        blocks: Blocks per stage.
        width: Channels of the stem and the first stage.
        in_channels: Input channels.
        num_classes: Outputs of the head.
        norm: BatchNorm in the stem and the blocks.

    Returns:
        The model, named ``stem``, ``stages``, ``head``.

    Raises:
        SignalpropError: A size is not a positive integer, or ``blocks`` is empty.

    Examples:
        >>> import torch
        >>> net = resnet((1, 1), width=8)
        >>> len(net.stages), net(torch.zeros(2, 3, 8, 8)).shape
        (2, torch.Size([2, 10]))
    """
    _check_positive(width=width, in_channels=in_channels, num_classes=num_classes)
    if not blocks or any(not isinstance(b, int) or b < 1 for b in blocks):
        raise SignalpropError(f"blocks must be a non-empty tuple of positive integers, got {blocks!r}")
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not norm),
                         nn.BatchNorm2d(width) if norm else nn.Identity(), nn.ReLU())
    stages: list[nn.Module] = []
    c = width
    for i, n in enumerate(blocks):
        c_out = width * 2**i
        for j in range(n):
            stages.append(BasicBlock(c, c_out, stride=2 if (i > 0 and j == 0) else 1, norm=norm))
            c = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return nn.Sequential(_named(stem=stem, stages=nn.Sequential(*stages), head=head))

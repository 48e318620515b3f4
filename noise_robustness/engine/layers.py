"""Which networks the engine stacks, and the steps of a stacked forward pass, decided once from the layers.

A network stacks when it is an ``nn.Sequential`` of the layers in ``SUPPORTED``, each where the stacked layouts can
run it: the image layout ``[K, B, C, H, W]``, the conv layout ``[B, K * C, H, W]`` (member k's channels are group
k) and the dense layout ``[K, B, features]``. Batch norm keeps each member's statistics (its channels are its own
in either layout), layer norm normalises a member's features (dense layout only), pooling and GELU act channel by
channel. Anything else (residual blocks, a norm with other settings) is looped over member by member.
"""

from torch import nn

POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU, nn.Dropout, nn.Flatten, *POOLS, *NORMS)


def stackable_layer(layer: nn.Module, layout: str) -> bool:
    """Whether the engine runs ``layer`` as ``nn.Module`` does, in ``layout`` ("image", "conv" or "dense")."""
    if isinstance(layer, nn.Conv2d):
        return (
            layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple) and layer.bias is not None
        )  # fmt: skip
    if isinstance(layer, nn.Linear):
        return layout == "dense" and layer.bias is not None
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        dense = isinstance(layer, nn.BatchNorm1d)
        return (
            layer.affine and layer.track_running_stats and layer.momentum is not None and (layout == "dense") == dense
        )
    if isinstance(layer, nn.LayerNorm):
        return (
            layout == "dense"
            and len(layer.normalized_shape) == 1
            and layer.elementwise_affine
            and layer.bias is not None
        )
    if isinstance(layer, POOLS):
        return layout != "dense" and not (isinstance(layer, nn.MaxPool2d) and (layer.dilation != 1 or layer.ceil_mode))
    if isinstance(layer, nn.Flatten):
        return layer.start_dim == 1 and layer.end_dim == -1
    return isinstance(layer, SUPPORTED)


def layouts(net: nn.Sequential) -> list[str]:
    """The layout each layer of ``net`` receives its input in."""
    found, layout = [], "image"
    for layer in net:
        found.append(layout)
        if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, *POOLS)):
            layout = "conv"
        elif isinstance(layer, nn.Flatten):
            layout = "dense"
    return found


def stackable(net: nn.Module) -> bool:
    """Whether ``net`` is an ``nn.Sequential`` of layers that :class:`StackedSequential` stacks, each where it runs."""
    if not isinstance(net, nn.Sequential):
        return False
    return all(stackable_layer(layer, layout) for layer, layout in zip(net, layouts(net)))


def plan_steps(layers: list[nn.Module]) -> list[tuple[str, object]]:
    """The steps of a stacked forward pass, decided once when the network is stacked.

    Two rewrites give the same numbers and gradients with less work: a ReLU before a max-pool runs
    after it (ReLU is monotone, so the two commute; a quarter of the values), and a ReLU followed by
    dropout is one step (one multiplication by a saved mask when training). Dropout with p = 0 is
    no step. Each step is ``(kind, argument)``: ``("conv", (param, stride, padding))``,
    ``("linear", param)``, ``("flatten", None)``, ``("pool", (kernel, stride, padding))``,
    ``("avgpool", (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override))``,
    ``("adaptive_avgpool", size)``, ``("batchnorm", (norm, momentum, eps))``, ``("layernorm", (norm, eps))``,
    ``("relu", None)``, ``("gelu", approximate)``, ``("relu_dropout", p)``, ``("dropout", p)``; ``param`` indexes the
    stacked weights, ``norm`` the stacked norms.
    """
    layers = list(layers)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    steps, param, norm, i = [], 0, 0, 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Conv2d):
            steps.append(("conv", (param, layer.stride, layer.padding)))
            param += 1
        elif isinstance(layer, nn.Linear):
            steps.append(("linear", param))
            param += 1
        elif isinstance(layer, nn.Flatten):
            steps.append(("flatten", None))
        elif isinstance(layer, nn.MaxPool2d):
            steps.append(("pool", (layer.kernel_size, layer.stride, layer.padding)))
        elif isinstance(layer, nn.AvgPool2d):
            arg = (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode, layer.count_include_pad)
            steps.append(("avgpool", (*arg, layer.divisor_override)))
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            steps.append(("adaptive_avgpool", layer.output_size))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            steps.append(("batchnorm", (norm, layer.momentum, layer.eps)))
            norm += 1
        elif isinstance(layer, nn.LayerNorm):
            steps.append(("layernorm", (norm, layer.eps)))
            norm += 1
        elif isinstance(layer, nn.GELU):
            steps.append(("gelu", layer.approximate))
        elif isinstance(layer, nn.ReLU) and isinstance(following, nn.Dropout) and following.p > 0:
            steps.append(("relu_dropout", following.p))
            i += 1  # the dropout is part of this step
        elif isinstance(layer, nn.ReLU):
            steps.append(("relu", None))
        elif isinstance(layer, nn.Dropout) and layer.p > 0:
            steps.append(("dropout", layer.p))
        i += 1
    return steps

"""PGD against every member at once, checked against torchattacks' PGD and PGDL2 on one member, against the closed
form of a linear classifier, and for the properties every attack must have."""

import math

import pytest
import torch
import torchattacks
from torch import nn

from noise_robustness.attacks.pgd import PGD, assert_within, pgd, robust_accuracy
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.engine.stacked import MemberLoop, StackedSequential, build_member, stack
from noise_robustness.training.classifier import NoiseClassifier

MADRY_LINF = PGD("linf", 0.1, steps=40, step_size=0.01)
L2 = PGD("l2", 1.0, steps=20, step_size=0.1)


@pytest.fixture(scope="module")
def trained(data_dir) -> tuple[NoiseClassifier, torch.Tensor, torch.Tensor]:
    """Three MLP members (σ 0, 0.5, 1; seed 0) after 60 training steps, and 200 validation images with labels."""
    data = NoisyMNISTDataModule(scales=[0.0, 0.5, 1.0], seeds=[0], data_dir=data_dir)
    data.setup("fit")
    model = NoiseClassifier(scales=[0.0, 0.5, 1.0], seeds=[0])
    optimizer = model.configure_optimizers()
    model.net.start_epoch(0, 0)
    for batch, _ in zip(data.loader("train", shuffle=True), range(60)):
        loss, _ = model.member_losses(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    file, indices = data.splits["val"]
    images = data.images[file][indices[:200]].float() / 255
    return model.eval(), images, data.file_labels[file][indices[:200]]


@pytest.mark.parametrize(("ours", "theirs"), [(MADRY_LINF, torchattacks.PGD), (L2, torchattacks.PGDL2)])
def test_a_members_attack_is_torchattacks_attack_of_its_network(trained, ours, theirs):
    """Our PGD on a member's own network (torch's modules, as a study of one) gives torchattacks' adversarial images
    and accuracy."""
    model, images, labels = trained
    alone = model.net.member(1).eval()
    expected = theirs(alone, eps=ours.eps, alpha=ours.step_size, steps=ours.steps, random_start=False)(images, labels)
    adversarial = pgd(MemberLoop([alone], [0]).eval(), images[None], labels[None], ours, check=True)[0]
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(alone(adversarial).argmax(1), alone(expected).argmax(1))


def test_a_stacked_members_attack_is_its_lone_networks(trained):
    """Stacked, a member's products sum in another order: its last bits can flip the sign of a gradient that is ~0,
    and adversarial images sit at decision boundaries; the images and accuracy agree up to a few of them."""
    model, images, labels = trained
    clean = images.expand(3, *images.shape).contiguous()
    together = pgd(model.net.eval(), clean, labels.expand(3, len(labels)), MADRY_LINF)
    alone = model.net.member(2).eval()
    lone = pgd(MemberLoop([alone], [0]).eval(), images[None], labels[None], MADRY_LINF)[0]
    assert ((together[2] - lone).abs() > 1e-5).float().mean() < 0.01
    with torch.no_grad():
        right = [int((alone(x).argmax(1) == labels).sum()) for x in (together[2], lone)]
    assert abs(right[0] - right[1]) <= 0.05 * len(labels), right


def linear_points(scale: float = 1.0):
    """A two-class linear classifier (its weights × ``scale``), 400 images inside [0, 1] away from its edges, their
    labels (the classifier's own answers) and each one's closed-form L2 distance to the boundary, |Δw · x + Δb| / ‖Δw‖
    (the same at any ``scale``)."""
    generator = torch.Generator().manual_seed(0)
    linear = build_member(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 2)), 0)
    with torch.no_grad():
        linear[1].weight.mul_(scale), linear[1].bias.mul_(scale)
    net = stack([linear], [0]).eval()
    assert isinstance(net, StackedSequential)
    images = 0.3 + 0.4 * torch.rand(400, 1, 28, 28, generator=generator)
    with torch.no_grad():
        weight, bias = linear[1].weight, linear[1].bias
        margins = images.flatten(1) @ (weight[1] - weight[0]) + (bias[1] - bias[0])
        distance = margins.abs() / (weight[1] - weight[0]).norm()
    return net, images, (margins > 0).long(), distance


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_l2_flips_a_linear_classifier_exactly_where_its_margin_is_below_eps(loss):
    """Two classes, logits w x + b: the smallest L2 perturbation that flips x is |Δw · x + Δb| / ‖Δw‖."""
    net, images, labels, distance = linear_points()
    eps = float(distance.median())  # half the points within reach, half beyond
    attack = PGD("l2", eps, steps=40, step_size=eps / 10, loss=loss)
    adversarial = pgd(net, images[None], labels[None], attack, check=True)
    with torch.no_grad():
        flipped = net(adversarial)[0].argmax(1) != labels
    resolution = 1e-4  # the last step stops within float rounding of the boundary
    assert flipped[distance < eps * (1 - resolution)].all()
    assert not flipped[distance > eps * (1 + resolution)].any()


def test_the_cross_entropy_saturates_on_a_confident_classifier_and_the_margin_does_not():
    """The same classifier with its logits × 1000: the same boundary, but softmax rounds the true class's probability to
    1, so the cross-entropy's gradient vanishes and its PGD stalls; the margin's flips every point within reach."""
    net, images, labels, distance = linear_points(scale=1000.0)
    eps = float(distance.median())
    within = distance < eps * (1 - 1e-4)
    flipped = {}
    for loss in ("ce", "margin"):
        adversarial = pgd(net, images[None], labels[None], PGD("l2", eps, 40, eps / 10, loss=loss), check=True)
        with torch.no_grad():
            flipped[loss] = net(adversarial)[0].argmax(1) != labels
    assert flipped["margin"][within].all() and not flipped["margin"][~within & (distance > eps * 1.0001)].any()
    assert flipped["ce"][within].float().mean() < 0.5  # most points within reach survive the saturated attack


def test_robust_accuracy_is_at_most_clean_and_falls_with_eps(trained):
    model, images, labels = trained
    attacks = [PGD("linf", eps, steps=10, step_size=eps / 4) for eps in (0.0, 0.05, 0.1, 0.2)]
    accuracy = robust_accuracy(model.net, images, labels, attacks, batch_size=100, check=True)
    with torch.no_grad():
        clean = (model.net(images.expand(3, *images.shape)).argmax(-1) == labels).double().mean(1)
    assert torch.equal(accuracy[0], clean)  # ε = 0: the clean images
    assert (accuracy[1:] <= accuracy[:-1]).all(), accuracy
    assert accuracy[-1].max() < accuracy[0].min()  # the attack works


def test_a_looped_network_is_attacked_member_by_member(trained):
    model, images, labels = trained
    looped = MemberLoop([model.net.member(k).eval() for k in range(3)], [0, 0, 0]).eval()
    clean = images[:50].expand(3, 50, 1, 28, 28).contiguous()
    for attack in (MADRY_LINF, L2, PGD("l2", 1.0, steps=5, step_size=0.3, random_start=True)):
        adversarial = pgd(looped, clean, labels[:50].expand(3, 50), attack, torch.Generator().manual_seed(0))
        assert_within(adversarial, clean, attack)


@pytest.mark.parametrize(
    "attack, message",
    [
        (PGD("linf", -0.1), "Expected `eps` to be a finite number >= 0, but got -0.1"),
        (PGD("linf", math.inf), "Expected `eps` to be a finite number >= 0, but got inf"),
        (PGD("l1", 0.1), "Expected `norm` to be one of ('linf', 'l2'), but got 'l1'"),
        (PGD("l2", 0.1, loss="dlr"), "Expected `loss` to be one of ('ce', 'margin'), but got 'dlr'"),
        (PGD("l2", 0.5, steps=0), "Expected `steps` to be a positive integer, but got 0"),
    ],
)
def test_a_bad_attack_is_one_message_naming_the_option(attack, message):
    with pytest.raises(ValueError) as error:
        attack.check()
    assert str(error.value) == message


def test_an_l2_ball_of_radius_zero_is_the_clean_image_even_where_the_gradient_is_zero():
    """0 / 0 would make a NaN image: a perturbation of norm 0 stays 0 (a network with zero weights: zero gradient)."""
    linear = build_member(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 2)), 0)
    with torch.no_grad():
        linear[1].weight.zero_()
    net = stack([linear], [0]).eval()
    images, labels = torch.rand(1, 5, 1, 28, 28), torch.zeros(1, 5, dtype=torch.long)
    for eps in (0.0, 0.5):
        adversarial = pgd(net, images, labels, PGD("l2", eps, steps=3, step_size=0.1), check=True)
        assert torch.equal(adversarial, images)  # nowhere to go, and no NaN

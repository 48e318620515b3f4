"""Stacked members against the networks they stand for, and the fast dropout and RMSprop against torch's."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noise_robustness.classifier import NoiseClassifier
from noise_robustness.data import NoisyMNISTDataModule
from noise_robustness.models import DropoutMLP, KerasCNN
from noise_robustness.stacked import (
    KEEP_BITS,
    MemberLoop,
    StackedRMSprop,
    StackedSequential,
    build_member,
    keep_mask,
    stack_members,
)


@pytest.fixture(scope="module")
def batches(data_dir) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """20 real training batches for the members (σ, seed) of [0, 1] x [0, 3]."""
    dm = NoisyMNISTDataModule(scales=[0.0, 1.0], seeds=[0, 3], data_dir=data_dir)
    dm.setup("fit")
    loader = dm.loader("train", shuffle=True)
    return [batch for batch, _ in zip(loader, range(20))]


def member_batch(batch, k: int):
    images, labels = batch
    return images[k : k + 1], labels[k : k + 1]


@pytest.mark.parametrize("fast", [True, False])
def test_a_member_trains_as_its_network_alone(batches, fast):
    """Member k of a stack and a K = 1 model of the same (σ, seed) see the same data, weights and dropout masks."""
    together = NoiseClassifier(scales=[0.0, 1.0], seeds=[0, 3], fast=fast)
    k = 3  # σ = 1, seed 3: the last member
    alone = NoiseClassifier(scales=[1.0], seeds=[3], fast=fast)
    losses = {}
    for name, model, pick in (("together", together, lambda b: b), ("alone", alone, lambda b: member_batch(b, k))):
        optimizer = model.configure_optimizers()
        model.net.start_epoch(0, 0)
        losses[name] = []
        for batch in batches:
            images, labels = pick(batch)
            per_member = (
                F.cross_entropy(model(images).flatten(0, 1), labels.flatten(), reduction="none")
                .view(labels.shape)
                .mean(1)
            )
            optimizer.zero_grad()
            per_member.sum().backward()
            optimizer.step()
            losses[name].append(per_member.detach())
    together_k = torch.stack([step[k] for step in losses["together"]])
    alone_0 = torch.stack([step[0] for step in losses["alone"]])
    assert torch.allclose(together_k, alone_0, rtol=1e-5, atol=0)
    assert not torch.allclose(
        torch.stack([s[0] for s in losses["together"]]), alone_0, rtol=1e-2
    )  # another member differs


@pytest.mark.parametrize("network", [DropoutMLP, KerasCNN])
def test_stacked_layers_compute_each_members_network(network):
    seeds = [0, 1, 2]
    stacked = stack_members(network, seeds)
    assert isinstance(stacked, StackedSequential)
    images = torch.rand(3, 8, 1, 28, 28)
    stacked.eval()
    out = stacked(images)
    for k, seed in enumerate(seeds):
        alone = build_member(network, seed).eval()
        assert torch.allclose(out[k], alone(images[k]), atol=1e-5)
        assert torch.allclose(stacked.member(k)(images[k]), alone(images[k]), atol=1e-6)  # exported as its own class
    loss = out.square().sum()
    loss.backward()
    alone = build_member(network, 1).eval()
    alone(images[1]).square().sum().backward()
    first = next(p for p in alone.parameters())
    grad = stacked.weights[0].grad
    expected = first.grad.t() if isinstance(alone[1] if network is DropoutMLP else alone[0], nn.Linear) else first.grad
    got = grad[1] if network is DropoutMLP else grad[first.shape[0] : 2 * first.shape[0]]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


class Tiny(nn.Module):
    """Not a Sequential: the members are looped over."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 10)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x.flatten(1)))


def test_any_network_works_as_a_member_loop():
    looped = stack_members(Tiny, [0, 1])
    assert isinstance(looped, MemberLoop)
    looped.start_epoch(2, 0)
    images = torch.rand(2, 4, 1, 28, 28)
    first = looped(images)
    looped.start_epoch(2, 0)
    assert torch.equal(looped(images), first)  # dropout reseeded from (seed, epoch, rank, step)
    alone = MemberLoop([build_member(Tiny, 1)], [1])
    alone.start_epoch(2, 0)
    assert torch.allclose(alone(images[1:]), first[1:])


def test_dropout_keeps_each_unit_with_probability_one_minus_p():
    generator = torch.Generator().manual_seed(0)
    p = 0.2
    draws = torch.cat([keep_mask((1000, 10_000), p, generator, fast=True).flatten() for _ in range(10)])  # 10^8
    assert len(draws) == 10**8
    assert abs(draws.float().mean().item() - (1 - p)) < 1e-4
    assert abs(round((1 - p) * 2**KEEP_BITS) / 2**KEEP_BITS - (1 - p)) < 1e-5  # the exact probability drawn
    # independent across units and images: neighbours and rows are uncorrelated
    mask = keep_mask((4096, 512), p, generator, fast=True).float()
    centred = mask - mask.mean()
    for shifted in (centred.roll(1, dims=1), centred.roll(1, dims=0), centred.roll(4, dims=1)):
        assert abs((centred * shifted).mean().item()) / centred.var().item() < 0.01


def test_dropout_is_independent_across_members_and_steps_and_scales_kept_units():
    stacked = stack_members(DropoutMLP, [0, 1])
    stacked.start_epoch(0, 0)
    x = torch.ones(2, 256, 512)
    masks = [stacked._dropout(x, 0.2, relu=True, conv=False) for _ in range(2)]
    assert set(masks[0].unique().tolist()) == {0.0, 1.25}  # kept units scaled by 1 / (1 - p)
    kept = [(m > 0).float() for m in masks]
    for a, b in ((kept[0][0], kept[0][1]), (kept[0][0], kept[1][0])):  # members; steps
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / a.var()
        assert abs(correlation) < 0.02


def test_the_fast_rmsprop_step_is_torchs(data_dir, batches):
    models = [NoiseClassifier(scales=[0.5], seeds=[1], fast=False) for _ in range(2)]
    optimizers = [
        StackedRMSprop(models[0].parameters(), lr=1e-3, alpha=0.9, eps=1e-7),
        torch.optim.RMSprop(models[1].parameters(), lr=1e-3, alpha=0.9, eps=1e-7),
    ]
    for model in models:
        model.net.start_epoch(0, 0)
    for step in range(100):
        images, labels = member_batch(batches[step % len(batches)], 1)
        for model, optimizer in zip(models, optimizers):
            loss = F.cross_entropy(model(images)[0], labels[0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for fast, reference in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(fast, reference, rtol=1e-6, atol=1e-9)
    assert not torch.equal(
        next(models[0].parameters()), next(NoiseClassifier(scales=[0.5], seeds=[1]).parameters())
    )  # it trained


def test_member_run_names_sort_as_numbers():
    from noise_robustness.study import run_names, study_members

    main = run_names(study_members([0, 0.1, 0.5, 1, 2, 4], [0, 1]))
    assert main[:6] == [
        "sigma=0.0/seed=0",
        "sigma=0.1/seed=0",
        "sigma=0.5/seed=0",
        "sigma=1.0/seed=0",
        "sigma=2.0/seed=0",
        "sigma=4.0/seed=0",
    ]
    for scales, seeds in (([0, 0.1, 0.5, 1, 2, 4], [0, 2, 10]), ([0, 25.5, 127.5, 255, 510, 1020], [0])):
        members = study_members(scales, seeds)
        by_name = [m for _, m in sorted(zip(run_names(members), members))]
        assert by_name == sorted(members, key=lambda m: (m.noise_scale, m.seed))

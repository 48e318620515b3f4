"""Stacked members against the networks they stand for, and the fast dropout and RMSprop against torch's."""

import collections
import contextlib
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.op_count import STUDIES_BY_K, CountOps, ops_per_step
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.data.noise import derive_seed
from noise_robustness.engine.masks import KEEP_BITS, CounterMasks, keep_mask
from noise_robustness.engine.rmsprop import StackedRMSprop, compiler_missing
from noise_robustness.engine.stacked import MemberLoop, StackedSequential, build_member, stack_members
from noise_robustness.models import DropoutMLP, KerasCNN
from noise_robustness.training.classifier import NoiseClassifier
from tests.conftest import needs_native_bf16

needs_compiler = pytest.mark.skipif(compiler_missing() is not None, reason=str(compiler_missing()))


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


@pytest.mark.parametrize("masks", ["per_member", "counter"])
def test_a_member_trains_as_its_network_alone(batches, masks):
    """Member k of a stack and a K = 1 model of the same (σ, seed) see the same data, weights, dropout masks and
    updates, step after step. Stacking changes the products' summation order, and training amplifies such
    differences wherever a pre-activation sits near 0 (for some masks within 10 steps): so the lone model starts
    every step from the stacked member's weights and optimizer state."""
    together = NoiseClassifier(scales=[0.0, 1.0], seeds=[0, 3], dropout_masks=masks)
    k = 3  # σ = 1, seed 3: the last member
    alone = NoiseClassifier(scales=[1.0], seeds=[3], dropout_masks=masks)
    optimizers = {"together": together.configure_optimizers(), "alone": alone.configure_optimizers()}
    for model in (together, alone):
        model.net.start_epoch(0, 0)
    losses = {"together": [], "alone": []}
    for batch in batches:
        for name, model, (images, labels) in (("together", together, batch), ("alone", alone, member_batch(batch, k))):
            per_member = (
                F.cross_entropy(model(images).flatten(0, 1), labels.flatten(), reduction="none")
                .view(labels.shape)
                .mean(1)
            )
            optimizers[name].zero_grad()
            per_member.sum().backward()
            optimizers[name].step()
            losses[name].append(per_member.detach())
        with torch.no_grad():  # the next step from the same point
            for stacked, lone in zip(together.parameters(), alone.parameters()):
                lone.copy_(stacked[k : k + 1])
                optimizers["alone"].state[lone]["square_avg"].copy_(
                    optimizers["together"].state[stacked]["square_avg"][k : k + 1]
                )
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
    # fixed images: stacking changes the last bits, and for some images (1 in 40 seeds) two pooled values close
    # enough to swap their maximum route a gradient elsewhere (2.6e-3 apart)
    images = torch.rand(3, 8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
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
    draws = torch.cat([keep_mask((1000, 10_000), p, generator).flatten() for _ in range(10)])  # 10^8
    assert len(draws) == 10**8
    assert abs(draws.float().mean().item() - (1 - p)) < 1e-4
    assert abs(round((1 - p) * 2**KEEP_BITS) / 2**KEEP_BITS - (1 - p)) < 1e-5  # the exact probability drawn
    # independent across units and images: neighbours and rows are uncorrelated
    mask = keep_mask((4096, 512), p, generator).float()
    centred = mask - mask.mean()
    for shifted in (centred.roll(1, dims=1), centred.roll(1, dims=0), centred.roll(4, dims=1)):
        assert abs((centred * shifted).mean().item()) / centred.var().item() < 0.01


def test_dropout_is_independent_across_members_and_steps_and_scales_kept_units():
    stacked = stack_members(DropoutMLP, [0, 1], masks="per_member")
    stacked.start_epoch(0, 0)
    x = torch.ones(2, 256, 512)
    masks = [stacked._member_dropout(x, 0, 0.2, relu=True, conv=False) for _ in range(2)]
    assert set(masks[0].unique().tolist()) == {0.0, 1.25}  # kept units scaled by 1 / (1 - p)
    kept = [(m > 0).float() for m in masks]
    for a, b in ((kept[0][0], kept[0][1]), (kept[0][0], kept[1][0])):  # members; steps
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / a.var()
        assert abs(correlation) < 0.02


def test_the_engine_computes_what_torchs_own_path_computes(batches):
    """``fast`` false is torch's own path: each member's network as built, one after another, ``torch.optim.RMSprop``.
    The engine starts from the same weights bit for bit; without dropout (where the two draw other masks) it gives the
    same losses up to the stacked products' summation order: within 2e-7 relative for 5 steps, after which RMSprop's
    normalised steps amplify the last bits (measured: 9e-4 relative by the 20th step, bounded here at 5e-3)."""
    network = functools.partial(DropoutMLP, dropout=0.0)
    engine, reference = (NoiseClassifier(net=network, scales=[0.0, 1.0], seeds=[0, 3], fast=f) for f in (True, False))
    assert isinstance(reference.net, MemberLoop) and isinstance(reference.configure_optimizers(), torch.optim.RMSprop)
    for k in range(4):
        for name, tensor in engine.net.member(k).state_dict().items():
            assert torch.equal(tensor, reference.net.member(k).state_dict()[name])
    optimizers = [model.configure_optimizers() for model in (engine, reference)]
    for model in (engine, reference):
        model.net.start_epoch(0, 0)
    losses = [[], []]
    for batch in batches:
        for model, optimizer, trace in zip((engine, reference), optimizers, losses):
            loss, _ = model.member_losses(*batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.detach())
    engine_losses, reference_losses = torch.stack(losses[0]), torch.stack(losses[1])
    torch.testing.assert_close(engine_losses[:5], reference_losses[:5], rtol=1e-6, atol=0)
    torch.testing.assert_close(engine_losses, reference_losses, rtol=5e-3, atol=0)
    assert losses[0][-1] < 0.8 * losses[0][0]  # it trained


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
        assert torch.equal(fast, reference)  # the same arithmetic per element: bit for bit
    assert not torch.equal(
        next(models[0].parameters()), next(NoiseClassifier(scales=[0.5], seeds=[1], fast=False).parameters())
    )  # it trained


def test_member_run_names_sort_as_numbers():
    from noise_robustness.study.members import run_names, study_members

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


# -- counter-based masks: one draw a step for every member and layer -----------------------------------------------


def numpy_counter_masks(seeds, epoch, rank, step, images, layers):
    """``CounterMasks.scaled_masks`` as its docstring specifies it, in numpy's unsigned 32-bit arithmetic."""
    import numpy as np

    def xorshift(x, shift):
        return x ^ (x >> np.uint32(shift))

    def lowbias32(x):
        x = xorshift(x, 16) * np.uint32(0x7FEB352D)
        x = xorshift(x, 15) * np.uint32(0x846CA68B)
        return xorshift(x, 16)

    units = sum(n for n, _ in layers)
    counters = lowbias32(np.arange(images * units, dtype=np.uint32))
    thresholds = np.repeat([round((1 - p) * 2**32) for _, p in layers], [n for n, _ in layers])
    scales = np.repeat([1 / (1 - p) for _, p in layers], [n for n, _ in layers]).astype(np.float32)
    masks = []
    for seed in seeds:
        key = np.uint32(derive_seed("dropout", seed, epoch, rank, step) & 0xFFFFFFFF)
        with np.errstate(over="ignore"):
            words = xorshift((counters ^ key) * np.uint32(0x7FEB352D), 15) * np.uint32(0x846CA68B)
        kept = words.view(np.int32).reshape(images, units) < thresholds - 2**31  # read as signed
        masks.append(np.where(kept, scales, np.float32(0)))
    return torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=[pytest.mark.slow, needs_compiler])]
)  # compiling: ~15 s
def test_counter_masks_are_the_specified_hash_and_depend_on_neither_k_nor_position(compiled):
    layers = ((40, 0.2), (24, 0.5))
    masks = CounterMasks([7, 3, 11], compiled)
    masks.start_epoch(4, 1)
    for step in (0, 5, CounterMasks.STEPS + 2):  # the second block of member keys too
        drawn = masks.scaled_masks(step, 9, layers, torch.float32, torch.device("cpu"))
        assert torch.equal(drawn, numpy_counter_masks([7, 3, 11], 4, 1, step, 9, layers))
        alone = CounterMasks([3])
        alone.start_epoch(4, 1)
        assert torch.equal(drawn[1:2], alone.scaled_masks(step, 9, layers, torch.float32, torch.device("cpu")))
    assert set(drawn.unique().tolist()) == {0.0, 1.25, 2.0}  # kept units scaled by 1 / (1 - p), per layer
    bf16 = masks.scaled_masks(0, 9, layers, torch.bfloat16, torch.device("cpu"))
    assert bf16.dtype == torch.bfloat16 and torch.equal(
        bf16.float(), numpy_counter_masks([7, 3, 11], 4, 1, 0, 9, layers)
    )


def test_counter_masks_keep_each_unit_with_probability_one_minus_p_independently():
    p, layers = 0.2, ((10_000, 0.2),)
    masks = CounterMasks([0, 1])
    masks.start_epoch(0, 0)
    kept = sum(
        (masks.scaled_masks(step, 500, layers, torch.float32, torch.device("cpu")) > 0).sum() for step in range(10)
    )
    assert abs(kept.item() / 10**8 - (1 - p)) < 1e-4  # 10^8 draws: 2 members x 10 steps x 500 images x 10,000 units
    assert abs((round((1 - p) * 2**32)) / 2**32 - (1 - p)) < 1e-9  # the exact probability drawn
    step0, step1 = (masks.scaled_masks(s, 4096, ((512, p),), torch.float32, torch.device("cpu")) > 0 for s in (0, 1))
    other_epoch = CounterMasks([0])
    other_epoch.start_epoch(1, 0)
    other_rank = CounterMasks([0])
    other_rank.start_epoch(0, 1)
    a = step0[0].float()
    pairs = [
        a.roll(1, dims=1),
        a.roll(1, dims=0),
        a.roll(4, dims=1),
        a.roll(2, dims=1),  # units, images
        step0[1].float(),
        step1[0].float(),  # members, steps
        *(
            (m.scaled_masks(0, 4096, ((512, p),), torch.float32, torch.device("cpu"))[0] > 0).float()
            for m in (other_epoch, other_rank)
        ),
    ]
    for b in pairs:
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / a.var()
        assert abs(correlation.item()) < 0.01


@pytest.mark.parametrize("network", [DropoutMLP, KerasCNN])
def test_a_stacked_members_counter_dropout_is_its_own(network):
    """In training mode (dropout on), member k of a stack computes what a stack of it alone computes (conv too)."""
    seeds = [0, 3]
    together, alone = stack_members(network, seeds, masks="counter"), stack_members(network, [3], masks="counter")
    for net in (together, alone):
        net.start_epoch(2, 0)
    images = torch.rand(2, 5, 1, 28, 28)
    for _ in range(2):  # two steps: the step advances
        out = together(images)
        assert torch.allclose(out[1:], alone(images[1:]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together.train(False)(images)[1:], out[1:])  # dropout was on


def step_ops(data_dir, scales, seeds, masks: str) -> collections.Counter:
    """The operations of one training step of a study's members (composing the batch, forward, loss, metrics,
    backward, optimizer), counted after a first step."""
    dm = NoisyMNISTDataModule(scales=scales, seeds=seeds, data_dir=data_dir)
    dm.setup("fit")
    model = NoiseClassifier(scales=scales, seeds=seeds, dropout_masks=masks)
    optimizer = model.configure_optimizers()
    model.net.start_epoch(0, 0)
    batches = iter(dm.loader("train", shuffle=True))

    def step():
        loss = model.training_step(next(batches), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    with CountOps() as counter:
        step()
    return counter.ops


def test_a_training_step_is_the_same_few_operations_at_any_number_of_members(data_dir):
    """With counter masks, a training step dispatches the same operations at K = 1, 6 and 18 (views aside), and
    never reads a value back to the host (``.item()``, ``bool(tensor)``); per-member masks cost a draw per member."""
    ops = {k: step_ops(data_dir, *study, "counter") for k, study in STUDIES_BY_K.items()}
    assert ops[1] == ops[6] == ops[18], ops
    assert "_local_scalar_dense" not in ops[18]  # what .item(), float(tensor) and bool(tensor) dispatch
    assert step_ops(data_dir, *STUDIES_BY_K[6], "per_member")["random_"] == 6 * 2  # a draw per member and layer


# Operations a step takes under the trainer (default options, on a CPU: the optimizer's state floor is one of them);
# issue 16 asks for at most 60. bf16 adds autocast's casts of the images and the logits (and the logits' gradient
# back) and the copies into and out of the bf16 weights, and saves one in the dropout masks (uint8 times bf16 in one
# operation). Exact, so that an operation more fails here.
STEP_OPS = {"32-true": 56, "bf16-mixed": 60}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=needs_native_bf16)])
def test_a_training_step_under_the_trainer_is_a_fixed_few_operations_at_any_number_of_members(precision, data_dir):
    """The same through the CLI and Lightning's loop (the benchmark's count): equal at K = 1, 6, 18, and few."""
    ops = {
        k: ops_per_step(data_dir, *study, f"--trainer.precision={precision}", n=2) for k, study in STUDIES_BY_K.items()
    }
    assert ops[1] == ops[6] == ops[18], ops
    assert sum(ops[18].values()) == STEP_OPS[precision], ops[18]
    assert "_local_scalar_dense" not in ops[18]


# -- bf16 copies of the weights, written by the optimizer -----------------------------------------------------------


def train_under_autocast(network, bf16_copies: bool, compiled: bool, steps: int = 6):
    """A stack of two members trained ``steps`` steps under bf16 autocast, counter masks; returns its parameters,
    optimizer state and evaluation output (under autocast too), and the network."""
    seeds = [0, 3]
    net = StackedSequential(
        [build_member(network, s) for s in seeds], seeds, masks="counter", compiled=compiled, bf16_copies=bf16_copies
    )
    optimizer = StackedRMSprop(net.parameters(), 1e-3, 0.9, 1e-7, compiled=compiled, bf16_copies=net.bf16_copies)
    net.start_epoch(0, 0)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(steps + 1, 2, 16, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (steps, 2, 16), generator=generator)
    for x, y in zip(images, labels):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net.eval()(images[-1])
    params = list(net.parameters())
    return params, [optimizer.state[p]["square_avg"] for p in params], out, net


@pytest.mark.parametrize(
    "network, compiled",
    [
        pytest.param(DropoutMLP, False, marks=needs_native_bf16),
        pytest.param(KerasCNN, False, marks=needs_native_bf16),
        pytest.param(DropoutMLP, True, marks=[pytest.mark.slow, needs_compiler, needs_native_bf16]),
    ],
)
def test_bf16_copies_train_bit_for_bit_as_autocasts_own_casts(network, compiled):
    """The forward pass on the optimizer's bf16 copies and the update from their bf16 gradients give autocast's
    numbers exactly: the same weights, optimizer state and outputs after training (the CNN's channels-last
    weights too; compiled: the same fused update either way)."""
    params, states, out, net = train_under_autocast(network, bf16_copies=True, compiled=compiled)
    cast_params, cast_states, cast_out, _ = train_under_autocast(network, bf16_copies=False, compiled=compiled)
    for ours, autocasts in zip([*params, *states, out], [*cast_params, *cast_states, cast_out]):
        assert torch.equal(ours, autocasts)
    assert all(p.grad is None for p in params)  # the gradients stayed on the copies
    assert all(torch.equal(c, p.bfloat16()) for c, p in zip(net.bf16_copies.copies, params))  # written by the step


def train_cnn_in_groups(group: int | None, bf16: bool, masks: str) -> list[torch.Tensor]:
    """Four CNN members (σ 0 and 1, seeds 0 and 1) trained 3 steps on a CPU, ``group`` members at a time; their
    parameters, optimizer state and last outputs (training and evaluation)."""
    StackedSequential.cpu_conv_group = group
    try:
        model = NoiseClassifier(net=KerasCNN, scales=[0.0, 1.0], seeds=[0, 1], dropout_masks=masks)
        optimizer = model.configure_optimizers()
        model.net.start_epoch(0, 0)
        generator = torch.Generator().manual_seed(1)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        for _ in range(3):
            images, labels = (
                torch.rand(4, 16, 1, 28, 28, generator=generator),
                torch.randint(10, (4, 16), generator=generator),
            )
            with autocast:
                out = model.net(images)
            optimizer.zero_grad()
            F.cross_entropy(out.float().flatten(0, 1), labels.flatten()).backward()
            optimizer.step()
        with autocast:
            evaluated = model.net.eval()(images)
        params = list(model.net.parameters())
        return [*params, *(optimizer.state[p]["square_avg"] for p in params), out, evaluated]
    finally:
        StackedSequential.cpu_conv_group = 3


@pytest.mark.parametrize(
    "bf16, masks", [(False, "per_member"), (False, "counter"), pytest.param(True, "counter", marks=needs_native_bf16)]
)
def test_a_conv_network_in_groups_of_members_trains_bit_for_bit_as_all_at_once(bf16, masks):
    """On a CPU a conv network runs at most ``cpu_conv_group`` members at a time (4 members: two groups of 2, never
    a lone one), for speed: the same weights, optimizer state and outputs, bit for bit, as all members at once."""
    cpu = torch.device("cpu")
    assert [stack_members(KerasCNN, list(range(k))).member_groups(cpu) for k in (2, 4, 7, 18)] == [
        [2], [2, 2], [3, 2, 2], [3] * 6
    ]  # fmt: skip
    assert stack_members(DropoutMLP, [0, 1, 2, 3]).member_groups(cpu) == [4]  # no convolution
    assert stack_members(KerasCNN, [0, 1, 2, 3]).member_groups(torch.device("cuda")) == [4]  # a GPU: all at once
    grouped, at_once = train_cnn_in_groups(3, bf16, masks), train_cnn_in_groups(None, bf16, masks)
    for ours, reference in zip(grouped, at_once, strict=True):
        assert torch.equal(ours, reference)


def test_bf16_copies_follow_weights_changed_outside_the_optimizer():
    """A checkpoint loaded or a weight set by hand changes what the copies hold at the next forward pass."""
    net = stack_members(DropoutMLP, [0, 1]).eval()
    images = torch.rand(2, 4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = net(images)
        net.load_state_dict(stack_members(DropoutMLP, [5, 6]).state_dict())
        with torch.no_grad():
            net.biases[2][1] += 1.0
        after = net(images)
        net.bf16_copies = None  # autocast's own casts
        expected = net(images)
    assert torch.equal(after, expected) and not torch.equal(after, before)


@pytest.mark.slow
@needs_compiler
def test_the_compiled_rmsprop_step_is_the_eager_one_but_for_the_last_bits():
    """torch.compile fuses the five passes into one (fused multiply-adds): 50 steps on the same gradients end
    within 1e-6 of the eager step's parameters (a thousandth of one step's update at lr 1e-3; measured: 4.8e-7,
    one unit in the last place of a parameter near 4)."""
    torch.manual_seed(0)
    params = [[torch.randn(18, 784, 512), torch.randn(18, 1, 512)] for _ in range(2)]
    params[1] = [p.clone() for p in params[0]]
    initial = params[0][0].clone()
    optimizers = [StackedRMSprop(p, lr=1e-3, alpha=0.9, eps=1e-7, compiled=c) for p, c in zip(params, (False, True))]
    for _ in range(50):
        grads = [torch.randn_like(p) * 1e-3 for p in params[0]]
        for group, optimizer in zip(params, optimizers):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            optimizer.step()
    for eager, compiled in zip(*params):
        assert torch.allclose(compiled, eager, rtol=0, atol=1e-6)
    assert not torch.equal(params[0][0], initial)  # it trained


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count``, then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_the_cpu_step_keeps_no_subnormal_state_and_moves_no_parameter_above_1e_26():
    """On a CPU the step keeps RMSprop's state above the subnormal floats (``state_floor``: a subnormal state made
    a CNN step 80 ms slower) and flushes subnormals on its own thread (``denormals_flushed``). On a state of normal,
    subnormal and zero entries, with zero, subnormal and ordinary gradients, 200 steps on two threads leave no
    state subnormal, and give every parameter of ``torch.optim.RMSprop`` (IEEE arithmetic, no floor) bit for bit,
    except parameters within 1e-26 of zero (a bias at zero that a subnormal gradient would have moved by 1e-34
    stays at zero); the states differ only below 1e-29, where ``sqrt(v) + eps`` is ``eps``."""
    torch.manual_seed(0)
    n = 100_000  # over two threads' share of an elementwise operation: the floor must reach both
    state = torch.rand(n) * 1e-6
    state[: n // 4] = 1e-40  # subnormal
    state[n // 4 : n // 2] = 0.0
    params = [torch.randn(n) * 0.05, torch.zeros(n)]  # weights, and biases starting at zero

    def trained(ours: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        group = [p.clone() for p in params]
        optimizer = (
            StackedRMSprop(group, lr=1e-3, alpha=0.9, eps=1e-7)
            if ours
            else torch.optim.RMSprop(group, lr=1e-3, alpha=0.9, eps=1e-7, foreach=False)
        )
        for p in group:
            optimizer.state[p]["square_avg"] = state.clone()
            optimizer.state[p]["step"] = torch.tensor(0.0)
        generator = torch.Generator().manual_seed(1)
        for step in range(200):
            for p in group:
                grad = torch.randn(n, generator=generator) * 1e-3
                grad[: n // 2] = 0.0 if step % 3 else 1e-39  # stopped units, sometimes a subnormal gradient
                p.grad = grad
            optimizer.step()
        return group, [optimizer.state[p]["square_avg"] for p in group]

    with torch_threads(2):
        (weights, biases), our_state = trained(ours=True)
        (ieee_weights, ieee_biases), ieee_state = trained(ours=False)
    assert torch.equal(weights, ieee_weights)
    differ = biases != ieee_biases
    assert differ.any() and torch.equal(biases[differ], torch.zeros(int(differ.sum())))
    assert ieee_biases[differ].abs().max() < 1e-26 and torch.equal(biases[~differ], ieee_biases[~differ])
    tiny = torch.finfo(torch.float32).tiny
    for ours, theirs in zip(our_state, ieee_state):
        assert not (ours < tiny).any()  # no state subnormal (nor zero), on either thread
        assert ((theirs < tiny) & (theirs > 0)).any()  # as torch's own step leaves them
        assert torch.equal(ours.where(theirs > 1e-29, 0), theirs.where(theirs > 1e-29, 0))


def norm_network() -> nn.Sequential:
    """Every layer the engine added for other datasets' networks: batch norm (2-D and 1-D), average and adaptive
    pooling, GELU, layer norm, on 3-channel images."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(54, 16), nn.LayerNorm(16), nn.GELU(approximate="tanh"),
        nn.BatchNorm1d(16), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.parametrize("group", [None, 2])  # all members at once; groups of two (a CPU's conv groups)
def test_a_stacked_network_with_norms_and_pools_equals_its_looped_self(group, monkeypatch):
    monkeypatch.setattr(StackedSequential, "cpu_conv_group", group)
    seeds = [0, 1, 2, 3]
    stacked = stack_members(norm_network, seeds)
    looped = MemberLoop([build_member(norm_network, seed) for seed in seeds], seeds)
    assert isinstance(stacked, StackedSequential) and len(stacked.norm_weights) == 4
    steps = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (stacked, looped)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # batch statistics, running statistics and the gradients through every layer
        images = torch.rand(4, 16, 3, 14, 14, generator=generator)
        outputs = []
        for net, step in zip((stacked, looped), steps):
            step.zero_grad()
            out = net.train()(images)
            out.square().mean().backward()
            step.step()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for k in range(len(seeds)):  # each member's weights and running statistics, as its network alone has them
        mine, alone = stacked.member(k).state_dict(), looped.members[k].state_dict()
        assert mine.keys() == alone.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], alone[key], rtol=1e-4, atol=1e-5, msg=key)
    images = torch.rand(4, 5, 3, 14, 14, generator=generator)
    torch.testing.assert_close(stacked.eval()(images), looped.eval()(images), rtol=1e-5, atol=1e-5)


def test_a_network_with_a_layer_where_the_engine_cannot_run_it_is_looped():
    for net in (
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(26), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)),  # conv layout
        nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 10)),
        nn.Sequential(nn.Flatten(), nn.Linear(784, 8, bias=False), nn.Linear(8, 10)),
    ):
        assert isinstance(stack_members(lambda net=net: net, [0, 1]), MemberLoop)


class Residual(nn.Module):
    """A network the engine does not stack (a residual block, batch norm, dropout): members are looped over."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(F.relu(x + self.block(x)))


def test_a_looped_member_trains_as_its_network_alone(batches):
    """A network that does not stack: member k of a study, trained beside others, is bit for bit the member of a
    study of it alone (its weights, batch statistics and dropout from its seed; its updates its own)."""
    together = NoiseClassifier(net=Residual, scales=[0.0, 1.0], seeds=[0, 3])
    alone = NoiseClassifier(net=Residual, scales=[1.0], seeds=[3])
    assert isinstance(together.net, MemberLoop)
    optimizers = [model.configure_optimizers() for model in (together, alone)]
    for model in (together, alone):
        model.net.start_epoch(0, 0)
    for batch in batches[:3]:
        for model, optimizer, (images, labels) in zip((together, alone), optimizers, (batch, member_batch(batch, 3))):
            loss, _ = model.member_losses(images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mine, lone = together.net.member(3).state_dict(), alone.net.member(0).state_dict()
    assert all(torch.equal(mine[key], lone[key]) for key in mine), [
        k for k in mine if not torch.equal(mine[k], lone[k])
    ]

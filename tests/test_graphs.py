"""The graphed training step (``--model.graphed``): the numbers of the default step, on a CPU (where it runs eagerly,
through the same manual step) and, where there is one, on a CUDA GPU (captured and replayed)."""

import pytest
import torch

from noise_robustness.cli import cli_main
from noise_robustness.data.batches import blocks_of
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from tests.conftest import exits_with_error, needs_native_bf16, rows, tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.slow  # two whole epochs of a study: ~10 s each
@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=needs_native_bf16)])
def test_the_graphed_step_trains_a_study_as_the_default_step_does(data_dir, tmp_path, precision):
    """On a CPU the graphed step runs eagerly, through manual optimisation, held dropout keys and the metrics'
    running sums: every member's accuracy and loss the same, to the last digit."""
    results = {}
    for graphed in ("false", "true"):
        out = tmp_path / f"graphed_{graphed}"
        cli_main(
            tiny(
                data_dir,
                out,
                f"--trainer.precision={precision}",
                f"--model.graphed={graphed}",
                "--data.batch_size=3500",
                batches=None,
            )
        )
        results[graphed] = [{k: v for k, v in r.items() if k != "_columns"} for r in rows(out / "results.csv")]
    assert results["true"] == results["false"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model.dropout_masks=per_member"], "`graphed` captures the fast path's step with the counter masks"),
        (["--model.fast=false"], "`graphed` captures the fast path's step with the counter masks"),
        (
            ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"],
            "`model.graphed` trains in one process, but this trainer runs 2",
        ),
    ],
)
def test_what_the_graphed_step_needs_is_said_before_anything_runs(data_dir, tmp_path, capsys, options, message):
    err = exits_with_error(tiny(data_dir, tmp_path / "out", "--model.graphed=true", *options), capsys)
    assert message in err and not (tmp_path / "out").exists()


def graphed_training(device: str, graphed: bool, steps: int, shapes=(32, 32, 32, 32, 32, 32, 20, 32)):
    """``steps`` steps of a 3-member stacked MLP under bf16 autocast, the step graphed or not; batches of the sizes
    ``shapes`` in turn (a second shape warms up and is captured apart). Returns the parameters, sums and optimizer."""
    from benchmarks.gpu_step import StackedTraining

    training = StackedTraining(device, graphed, k=3)
    generator = torch.Generator().manual_seed(0)
    for s in range(steps):
        batch = shapes[s % len(shapes)]
        images = torch.rand(3, batch, 1, 28, 28, generator=generator).to(device)
        labels = torch.randint(0, 10, (3, batch), generator=generator).to(device)
        training.step(images, labels)
    params = [p.detach().cpu() for p in training.net.parameters()]
    return params, [t.cpu() for t in training.sums.sums], training.optimizer


@needs_cuda
def test_a_captured_step_replays_the_eager_steps_numbers_on_a_gpu():
    """Captured and replayed (two shapes, each warmed up, captured, replayed; the update graph too), the same
    parameters and sums bit for bit as the eager step on the same GPU."""
    params, sums, optimizer = graphed_training("cuda", graphed=True, steps=40)
    assert optimizer._graph is not None  # the update was captured and replayed
    eager_params, eager_sums, _ = graphed_training("cuda", graphed=False, steps=40)
    for graphed, eager in zip([*params, *sums], [*eager_params, *eager_sums]):
        assert torch.equal(graphed, eager)


def test_the_step_graph_helper_runs_eagerly_off_a_gpu():
    params, sums, _ = graphed_training("cpu", graphed=True, steps=9)
    eager_params, eager_sums, _ = graphed_training("cpu", graphed=False, steps=9)
    for graphed, eager in zip([*params, *sums], [*eager_params, *eager_sums]):
        assert torch.equal(graphed, eager)


@needs_cuda
def test_counter_masks_are_the_same_bits_on_a_gpu_as_the_specification():
    from noise_robustness.engine.masks import CounterMasks
    from tests.test_stacked import numpy_counter_masks

    layers = ((512, 0.2), (512, 0.2), (128, 0.5))
    masks = CounterMasks([7, 3, 11])
    masks.start_epoch(4, 1)
    for step in (0, 5, CounterMasks.STEPS + 2):
        drawn = masks.scaled_masks(step, 128, layers, torch.float32, torch.device("cuda"))
        assert torch.equal(drawn.cpu(), numpy_counter_masks([7, 3, 11], 4, 1, step, 128, layers))


def test_blocks_serve_the_same_batches_in_the_same_order(data_dir):
    """The graphed step's blocks (``data.steps_per_batch``): consecutive batches of one size, up to S at a time, each
    image composed as it is batch by batch, bit for bit; the loader's length counts blocks."""
    assert blocks_of([1200] * 8 + [400], 3) == [(1200, 3), (1200, 3), (1200, 2), (400, 1)]
    # the 10,000 validation images, shuffled as training batches are: 8 batches of 1,200 and one of 400
    datamodule = NoisyMNISTDataModule(scales=[0, 1.0], seeds=[0, 1], data_dir=data_dir, batch_size=1200)
    datamodule.setup()
    batches = list(datamodule.loader("val", shuffle=True))
    blocks = datamodule.loader("val", shuffle=True, steps=3)
    served = list(blocks)
    assert len(blocks) == len(served) == 4 and [b[1].shape[1:] for b in served] == [
        (3, 1200),
        (3, 1200),
        (2, 1200),
        (1, 400),
    ]
    for part in (0, 1):  # images, labels
        assert torch.equal(
            torch.cat([b[part].flatten(1, 2) for b in served], 1), torch.cat([b[part] for b in batches], 1)
        )


def test_the_gpu_config_plans_the_same_study_as_the_default(tmp_path, monkeypatch):
    """`configs/gpu.yaml` (the graphed step, blocks of batches) changes how the step is launched, not the study: the
    same identity, so a study started on a CPU resumes on a GPU and the other way round."""
    from noise_robustness.cli import NoiseCLI

    monkeypatch.setattr(NoiseCLI, "sweep", lambda self, *args, **kwargs: None)  # planned, not run
    plain = cli_main(["sweep", f"--out={tmp_path / 'plain'}"])
    graphed = cli_main(["sweep", "--config=configs/gpu.yaml", f"--out={tmp_path / 'graphed'}"])
    assert graphed.config.sweep.model.graphed and graphed.config.sweep.data.steps_per_batch == 16
    assert graphed.plan.study.identity == plain.plan.study.identity

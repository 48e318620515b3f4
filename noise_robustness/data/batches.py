"""A split's batches for every member at once: which images each process serves, in which order and blocks, and the
row gathers that compose a batch (``MemberBatches``), without per-sample Python or a collate function."""

import math
from collections.abc import Callable, Iterator

import torch

from noise_robustness.data.noise import seeded


def shard_batches(order: torch.Tensor, rank: int, world_size: int, batch_size: int) -> list[torch.Tensor]:
    """``rank``'s share of each batch of ``order``: the batches are the one-process batches (``batch_size`` images,
    the last one partial), each split over the ``world_size`` processes in order (sizes differ by at most one), so
    every process takes the same number of steps and together they see each batch as one process would.

    Raises:
        ValueError: a batch of fewer images than processes (a process would get none).
    """
    batches = order.split(batch_size)
    if len(batches[-1]) < world_size:
        raise ValueError(
            f"Expected every batch of {len(order)} images in batches of {batch_size} to give each of {world_size} "
            f"processes an image, but the last holds {len(batches[-1])}: choose another batch_size or val_holdout"
        )
    return [torch.tensor_split(batch, world_size)[rank] for batch in batches] if world_size > 1 else list(batches)


def check_even_shares(images: int, batch_size: int, world_size: int) -> None:
    """Raises ValueError unless every training batch splits evenly over the processes: then each member's gradient,
    the mean of the processes' means, is the mean over the whole batch, as on one process, and a process's images
    start at ``rank x`` its share in every batch (its dropout masks' positions)."""
    last = images % batch_size or batch_size
    if world_size > 1 and (batch_size % world_size or last % world_size):
        raise ValueError(
            f"Expected the training batches ({batch_size} images, the last {last}) to split evenly over "
            f"{world_size} processes, so that each member's gradient is its batch's mean, but they do not: choose a "
            "batch_size (and val_holdout) that the number of processes divides"
        )


def blocks_of(sizes: list[int], steps: int) -> list[tuple[int, int]]:
    """Consecutive batches of these ``sizes`` grouped into blocks of at most ``steps`` batches of one size:
    ``(batch size, batches)`` per block, in order."""
    blocks: list[tuple[int, int]] = []
    for size in sizes:
        if blocks and blocks[-1][0] == size and blocks[-1][1] < steps:
            blocks[-1] = (size, blocks[-1][1] + 1)
        else:
            blocks.append((size, 1))
    return blocks


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for row indices ``rows`` of any shape, as one ``index_select`` of whole rows: the same
    values, copied row by row (a CPU runs advanced indexing element by element, several times slower)."""
    return table.index_select(0, rows.flatten()).view(*rows.shape, *table.shape[1:])


class MemberBatches:
    """Serves ``(images [K, B, C, H, W], labels [K, B])`` batches of a split: no per-sample Python, no collate.

    Each member's file rows for the whole epoch are looked up once when it starts (``rows``) and split into
    the batches' blocks; a batch is then composed with one gather per tensor (``compose``).

    Args:
        rows: ``(positions by seed) -> [K, n]``, each member's MNIST file rows at its seed's positions.
        compose: ``(rows [K, B], epoch=...) -> (images, labels)`` for every member.
        size: images in the split.
        seeds: the study's seeds; each shuffles with its own permutation per epoch.
        batch_size: images per batch, over all processes (``shard_batches``).
        position: returns ``(epoch, rank, world_size)`` when an epoch starts.
        shuffle: shuffle each epoch (seeded by (seed, epoch), the same on every rank) or keep the order.
        device: where the position batches go (the device the data lives on).
        steps: batches served together as one block ``(images [K, S, B, C, H, W], labels [K, S, B])`` of S <=
            ``steps`` consecutive batches of one size, composed at once (``blocks_of``); 1: batch by batch.
    """

    def __init__(
        self,
        rows: Callable[[dict[int, torch.Tensor]], torch.Tensor],
        compose: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
        size: int,
        seeds: list[int],
        batch_size: int,
        position: Callable[[], tuple[int, int, int]],
        shuffle: bool,
        device: torch.device,
        steps: int = 1,
    ):
        self.rows, self.compose, self.size, self.seeds, self.batch_size = rows, compose, size, seeds, batch_size
        self.position, self.shuffle, self.device, self.steps = position, shuffle, device, steps

    def batches(self, epoch: int, rank: int, world_size: int) -> dict[int, list[torch.Tensor]]:
        """This epoch's position batches for this process, per seed."""

        def order(seed: int) -> torch.Tensor:
            if not self.shuffle:
                return torch.arange(self.size)
            return seeded(torch.randperm, self.size, "shuffle", seed, epoch)

        return {
            seed: shard_batches(order(seed).to(self.device), rank, world_size, self.batch_size) for seed in self.seeds
        }

    def __len__(self) -> int:
        _, rank, world_size = self.position()
        if self.steps > 1:
            sizes = [len(batch) for batch in shard_batches(torch.arange(self.size), rank, world_size, self.batch_size)]
            return len(blocks_of(sizes, self.steps))
        return math.ceil(self.size / self.batch_size)  # every process takes a share of every batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, rank, world_size = self.position()
        by_seed = self.batches(epoch, rank, world_size)
        rows = self.rows({seed: torch.cat(batches) for seed, batches in by_seed.items()})  # [K, this epoch's shard]
        # every seed's batches have the same sizes; each batch's rows contiguous, made now rather than in a step
        # (``gather_rows`` reads them as one flat index, which a slice of several members' rows is not)
        sizes = [len(batch) for batch in by_seed[self.seeds[0]]]
        if self.steps == 1:
            for batch_rows in [chunk.contiguous() for chunk in rows.split(sizes, dim=1)]:
                yield self.compose(batch_rows, epoch=epoch)
            return
        blocks = blocks_of(sizes, self.steps)
        for (size, count), block_rows in zip(blocks, rows.split([size * count for size, count in blocks], dim=1)):
            images, labels = self.compose(block_rows.contiguous(), epoch=epoch)
            yield images.unflatten(1, (count, size)), labels.unflatten(1, (count, size))

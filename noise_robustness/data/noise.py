"""Additive Gaussian pixel noise, and the random patterns of every corruption: pure functions of (seed, split,
image index, epoch).

σ (``noise_scale``) is in units of the [0, 1] pixel range: σ = 1.0 is noise whose standard
deviation equals the whole black-to-white range. The original study used 255·σ on [0, 1] images;
pass ``noise_scale = 255 * s`` to reproduce it on purpose.

Image ``i`` of a split always gets the same standard-normal pattern ``z_i`` for a given seed (and
epoch, in ``resample`` mode), whatever the batch size, shuffle order, subset or number of processes:
``z`` is drawn in fixed blocks of ``BLOCK`` images, each block from its own generator whose seed
is a hash of (seed, split, epoch, block). The noise at level σ is ``σ · z_i``, so one image
carries the same pattern, only scaled, at every σ. The other corruptions (``corruptions.py``) read these
patterns too, and a uniform [0, 1) pattern drawn the same way from a stream of its own.
"""

import functools
import hashlib
import math

import torch

BLOCK = 1024  # images per generator; part of the noise definition, so never change it
NOISE_MODES = ("fixed", "resample")


def check_noise_scale(noise_scale: float, name: str = "noise_scale") -> float:
    """Returns ``noise_scale`` as a float, or raises ValueError naming the argument."""
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)):
        raise ValueError(f"Expected `{name}` to be a finite number >= 0, but got {noise_scale!r}")
    if not math.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"Expected `{name}` to be a finite number >= 0, but got {noise_scale}")
    return float(noise_scale)


def check_noise_mode(noise_mode: str) -> str:
    """Returns ``noise_mode``, or raises ValueError listing the allowed modes."""
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"Expected `noise_mode` to be one of {NOISE_MODES}, but got {noise_mode!r}")
    return noise_mode


def derive_seed(*key: object) -> int:
    """A 63-bit seed from ``key``, the same on every machine and process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def seeded(sample, shape: int | tuple[int, ...], *key: object, device: torch.device | str = "cpu") -> torch.Tensor:
    """``sample(shape)`` (``torch.randn``, ``torch.rand``, ``torch.randperm``) from a generator seeded by ``key`` alone:
    a pure function of the key on a device type. Every random draw of the data (noise, shuffles, the hold-out) and of
    ``certify``'s samples comes from here; dropout's are the engine's (``engine/masks.py``)."""
    generator = torch.Generator(device=device).manual_seed(derive_seed(*key))
    return sample(shape, generator=generator, device=device)


# A pattern's kind -> its generators' stream name and how a block is drawn. "noise" is Gaussian noise's stream,
# named before there were other kinds: part of the noise definition, so never rename it.
KINDS = {"normal": ("noise", torch.randn), "uniform": ("uniform", torch.rand)}


def draw(
    kind: str,
    n_images: int,
    image_shape: tuple[int, ...],
    seed: int,
    split: str,
    epoch: int = 0,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``kind`` patterns (``KINDS``) of images ``0 .. n_images - 1`` of ``split`` (written into ``out`` if given).

    Returns:
        A float32 tensor of shape ``(n_images, *image_shape)``; row ``i`` depends only on
        (seed, split, epoch, i) and the device type (CPU and CUDA generators differ).
    """
    out = torch.empty((n_images, *image_shape), device=device) if out is None else out
    stream, sample = KINDS[kind]  # each kind from generators of its own
    for block, start in enumerate(range(0, n_images, BLOCK)):
        # Always a whole block, so a shorter split (or a subset) gets the same rows.
        patterns = seeded(sample, (BLOCK, *image_shape), stream, seed, split, epoch, block, device=device)
        out[start : start + BLOCK] = patterns[: n_images - start]
    return out


# The standard-normal patterns of images 0 .. n_images - 1 of a split: Gaussian noise's z.
standard_normal = functools.partial(draw, "normal")


def add_noise(
    images: torch.Tensor, noise_scale: float | torch.Tensor, z: torch.Tensor | None, clip: bool = False
) -> torch.Tensor:
    """Returns ``images + noise_scale * z``, clipped to [0, 1] if ``clip``; σ = 0 returns ``images``.

    ``noise_scale`` is one σ, or a tensor of σ that broadcasts against ``images`` (one per member:
    ``[K, 1, 1, 1, 1]`` for ``[K, B, C, H, W]``), so that a batch of every member is one operation.
    ``z`` (standard-normal, shaped like ``images``) may be None when every σ is 0.
    """
    if isinstance(noise_scale, torch.Tensor):
        noisy = images if z is None else torch.addcmul(images, noise_scale, z)  # σ = 0: images + 0 · z, exactly
    else:
        noisy = images if noise_scale == 0 else torch.add(images, z, alpha=noise_scale)
    return noisy.clamp(0.0, 1.0) if clip else noisy

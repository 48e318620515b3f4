"""Corruptions of images (MNIST's, or another dataset's C x H x W), each a class chosen by ``class_path``: the study's
corruption axis.

A corruption maps clean images in [0, 1] to corrupted ones at a *severity*, in units its class
states. It draws nothing itself: its randomness comes from the per-image patterns of ``data/noise.py``
(a standard-normal pattern, and a uniform one), which are pure functions of (seed, split, image
index, epoch) and the same whatever the batch, subset or process. So a corrupted image is a pure
function of (seed, split, image index, epoch, severity), and K members get their batch from one
gather of the patterns, never from K corrupted copies of the data. Members of one seed share the
patterns, as Gaussian members of one seed share ``z`` at every σ.

Severity 0 is the clean image for every corruption: the study's clean member is one member per
seed, named ``sigma=0`` as it always was. A corruption's ``severities`` (null: the study's
``--scales``) are the levels it is trained or evaluated at.

The noises and MNIST-C's (Mu & Gilmer 2019, ``google-research/mnist-c``) corruptions that are
tensor code: Gaussian, uniform, impulse, shot, speckle, Gaussian blur, brightness, contrast, rotate,
shear, scale, translate, stripe. MNIST-C's others are not here: motion blur, spatter, snow and frost
need ImageMagick, OpenCV or image files; glass blur swaps pixels one after another (each swap sees
the last); canny edges is a hysteresis search; fog, dotted line and zigzag are random drawings that
could be written as tensor code, but not yet.

On C x H x W images (another dataset): the noises draw per channel, blur and warps act on every channel alike,
contrast keeps each channel's mean (ImageNet-C's), stripe inverts whole columns, brightness raises the HSV value.
Severities in pixels (blur, translate, stripe) are the dataset's pixels; angles and fractions are relative.
"""

import importlib
import math
from typing import ClassVar

import torch
from torch.nn import functional as F

from noise_robustness.data.noise import add_noise


class Corruption:
    """A corruption at a severity per member; subclasses set ``name``, ``unit``, the range and ``__call__``.

    Args:
        severities: the levels a study trains (``--corruptions``) or evaluates (``--eval_corruptions``)
            this corruption at, each once, in the class's unit; null: the study's ``--scales``.
    """

    name: ClassVar[str]  # how members, files and tables name it
    unit: ClassVar[str]  # what a severity means
    max_severity: ClassVar[float] = math.inf
    integer: ClassVar[bool] = False  # only whole severities
    patterns: ClassVar[tuple[str, ...]] = ()  # which kinds of per-image pattern it reads (noise.KINDS)

    def __init__(self, severities: list[float] | None = None):
        self.severities = None if severities is None else [self.check(s) for s in severities]
        if self.severities is not None and len(set(self.severities)) != len(self.severities):
            raise ValueError(f"Expected the severities of `{self.name}` to hold each value once, but got {severities}")

    def check(self, severity: float) -> float:
        """Returns ``severity`` as a float, or raises ValueError naming the corruption and its range."""
        top = "∞)" if math.isinf(self.max_severity) else f"{self.max_severity:g}]"
        allowed = f"{'whole numbers' if self.integer else 'numbers'} in [0, {top} ({self.unit})"
        if isinstance(severity, bool) or not isinstance(severity, (int, float)) or not math.isfinite(severity):
            raise ValueError(f"Expected severities of `{self.name}` to be {allowed}, but got {severity!r}")
        if not 0 <= severity <= self.max_severity or (self.integer and severity != int(severity)):
            raise ValueError(f"Expected severities of `{self.name}` to be {allowed}, but got {severity}")
        return float(severity)

    def levels(self, scales: list[float]) -> list[float]:
        """The severities it is trained or evaluated at: its own, else the study's ``scales`` (checked)."""
        if self.severities is not None:
            return self.severities
        try:
            return [self.check(s) for s in scales]
        except ValueError as err:
            raise ValueError(f"{err} from `scales`: give `{self.name}` severities of its own") from None

    def __call__(
        self,
        images: torch.Tensor,
        severity: torch.Tensor,
        normal: torch.Tensor | None = None,
        uniform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``images`` ``[G, n, C, H, W]`` of G members, corrupted at ``severity`` ``[G, 1, 1, 1, 1]`` (one per
        member, on the images' device), from the images' ``normal`` and ``uniform`` patterns (shaped like
        ``images``; given when the class names them in ``patterns``)."""
        raise NotImplementedError

    def __eq__(self, other) -> bool:  # the name is the identity: severities are where it is used, not what it is
        return isinstance(other, Corruption) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GaussianNoise(Corruption):
    """Additive Gaussian noise, the study's original corruption: ``x + σ z``, z standard normal per pixel.

    Severity: σ, the noise's std in units of the [0, 1] pixel range (MNIST-C's levels: 0.08 to 0.38).
    Every number of the Gaussian studies is unchanged: this is ``noise.add_noise``.
    """

    name, unit, patterns = "gaussian", "the noise's std in units of the [0, 1] pixel range", ("normal",)

    def __call__(self, images, severity, normal=None, uniform=None):
        return add_noise(images, severity, normal)


class UniformNoise(Corruption):
    """Additive uniform noise: ``x + s √3 (2u − 1)``, u uniform in [0, 1) per pixel.

    Severity: s, the noise's std in units of the [0, 1] pixel range (as Gaussian σ): the noise is
    uniform on [−√3 s, √3 s].
    """

    name, unit, patterns = "uniform", "the noise's std in units of the [0, 1] pixel range", ("uniform",)

    def __call__(self, images, severity, normal=None, uniform=None):
        return torch.addcmul(images, severity * math.sqrt(3), uniform * 2 - 1)


class ImpulseNoise(Corruption):
    """Salt-and-pepper noise (scikit-image's ``random_noise(mode="s&p")``, MNIST-C's ``impulse_noise``): each pixel
    independently becomes 1 with probability a/2 and 0 with probability a/2 (u < a/2: salt; a/2 ≤ u < a: pepper).

    Severity: a, the expected fraction of pixels replaced, in [0, 1] (MNIST-C's levels: 0.03 to 0.27).
    """

    name, unit, max_severity, patterns = "impulse", "the fraction of pixels replaced", 1.0, ("uniform",)

    def __call__(self, images, severity, normal=None, uniform=None):
        salt, pepper = uniform < severity / 2, uniform < severity
        return torch.where(salt, 1.0, torch.where(pepper, 0.0, images))


class ShotNoise(Corruption):
    """Shot (Poisson) noise: a pixel of intensity x catches Poisson(x c) photons, shown as count / c, where c = 1/s²
    is the photon count of a white pixel (MNIST-C's ``shot_noise``, c from 60 to 3).

    Severity: s = 1/√c, the noise's std at a white pixel in units of the [0, 1] pixel range (so that
    it reads as Gaussian σ; MNIST-C's levels: 0.13 to 0.58). The count is the Poisson quantile of
    the pixel's uniform pattern u (the smallest k with P(X ≤ k) ≥ u), exact for any x c.
    """

    name, unit, patterns = "shot", "the noise's std at a white pixel, 1/√(photons of a white pixel)", ("uniform",)

    def __call__(self, images, severity, normal=None, uniform=None):
        photons = 1 / severity.double().square()  # inf at s = 0: the image itself
        rate = images.double() * photons
        counts = poisson_quantile(rate.expand_as(uniform), uniform)
        out = (counts / photons).to(images.dtype)
        return torch.where(severity > 0, out, images)


def poisson_quantile(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The smallest k ≥ 0 with P(Poisson(rate) ≤ k) ≥ u, elementwise (float64 counts; 0 where rate is 0 or inf).

    Starts from the Cornish-Fisher approximation (rarely more than a step away) and steps each element that is
    not there yet, with P(X ≤ k) = Q(k + 1, rate), the regularized upper incomplete gamma function, and
    P(X ≤ k − 1) = P(X ≤ k) − P(X = k).
    """
    rate, counts = rate.reshape(-1), torch.zeros(rate.shape, dtype=torch.float64, device=rate.device)
    active = ((rate > 0) & torch.isfinite(rate)).nonzero().squeeze(1)
    lam, p = rate[active].double(), u.reshape(-1)[active].double()
    z = torch.special.ndtri(p.clamp(1e-12, 1 - 1e-12))
    k = (lam + lam.sqrt() * z + (z * z - 1) / 6).floor().clamp_(min=0)
    todo = torch.arange(len(lam), device=rate.device)
    for _ in range(10_000):  # a step or two from the start; the bound only guards a bug
        if not len(todo):
            break
        kt, lt, pt = k[todo], lam[todo], p[todo]
        at_most_k = torch.special.gammaincc(kt + 1, lt)
        exactly_k = torch.exp(kt * lt.log() - lt - torch.lgamma(kt + 1))
        below = at_most_k < pt  # P(X ≤ k) < u: k is too small
        above = (kt > 0) & (at_most_k - exactly_k >= pt)  # P(X ≤ k − 1) ≥ u: k − 1 will do
        k[todo] = kt + below.double() - above.double()
        todo = todo[below | above]
    counts.view(-1)[active] = k
    return counts


class SpeckleNoise(Corruption):
    """Speckle (multiplicative Gaussian) noise, scikit-image's ``random_noise(mode="speckle")``: ``x + x σ z``.

    Severity: σ, the noise's std relative to the pixel's intensity (MNIST-C's levels: 0.15 to 0.6).
    """

    name, unit, patterns = "speckle", "the noise's std relative to the pixel's intensity", ("normal",)

    def __call__(self, images, severity, normal=None, uniform=None):
        return torch.addcmul(images, images * severity, normal)


class GaussianBlur(Corruption):
    """Gaussian blur, as ``scipy.ndimage.gaussian_filter`` (and scikit-image's ``gaussian``) computes it: separable,
    the kernel cut at 4 std, edges extended by their nearest pixel (MNIST-C's ``gaussian_blur``).

    Severity: the kernel's std in pixels, at most 10 (MNIST-C's levels: 1 to 6).
    """

    name, unit, max_severity = "blur", "the kernel's std in pixels", 10.0

    def __call__(self, images, severity, normal=None, uniform=None):
        out = torch.empty_like(images)
        for g, sigma in enumerate(severity.flatten().tolist()):  # a kernel per member: its own size
            out[g] = gaussian_filter(images[g], sigma)
        return out


def gaussian_filter(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` ``[n, C, H, W]`` blurred by a Gaussian of std ``sigma`` pixels (the image itself at 0), each
    channel alike."""
    if sigma == 0:
        return images
    if images.shape[1] > 1:
        return gaussian_filter(images.flatten(0, 1)[:, None], sigma).view_as(images)
    radius = int(4.0 * sigma + 0.5)  # scipy's truncate = 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


class Brightness(Corruption):
    """Brightness, MNIST-C's ``brightness``: the HSV value raised by b: a grey image's ``min(x + b, 1)``, a colour
    image's brightest channel v to ``min(v + b, 1)`` and the others scaled with it (a black pixel: grey b).

    Severity: b in [0, 1], in units of the pixel range (MNIST-C's levels: 0.1 to 0.5).
    """

    name, unit, max_severity = "brightness", "the value added, in units of the pixel range", 1.0

    def __call__(self, images, severity, normal=None, uniform=None):
        if images.shape[-3] == 1:
            return (images + severity).clamp(0, 1)
        value = images.amax(dim=-3, keepdim=True)  # raised to min(value + b, 1), the channels in proportion:
        return torch.where(value > 0, images / value.clamp_min(1e-12), 1.0) * (value + severity).clamp(0, 1)


class Contrast(Corruption):
    """Contrast reduction, MNIST-C's ``contrast``: ``(x − m)(1 − s) + m``, m the image's mean intensity.

    Severity: s in [0, 1], the fraction of contrast removed (MNIST-C's levels: 0.6 to 0.95, its c = 1 − s).
    """

    name, unit, max_severity = "contrast", "the fraction of contrast removed", 1.0

    def __call__(self, images, severity, normal=None, uniform=None):
        mean = images.mean(dim=(-2, -1), keepdim=True)
        return ((images - mean) * (1 - severity) + mean).clamp(0, 1)


class Affine(Corruption):
    """An affine warp about the image's centre, sampled bilinearly with zeros outside, as MNIST-C's
    ``skimage.transform.warp`` with ``order=1``: output pixel p shows the input at ``A (p − c) + c``.
    Subclasses give A; a random direction (±1 per image) is the sign of u − ½ at the image's first pixels."""

    patterns = ("uniform",)

    def matrices(self, severity: torch.Tensor, signs: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """``[G, n, 2, 3]``: per image, A (in x = column, y = row, from the centre in units of half the image) and a
        shift; ``severity`` ``[G, 1]``, ``signs`` ``[G, n, 2]`` of ±1, ``half`` the pixels from the centre to an
        edge pixel along x and y (13.5 on MNIST)."""
        raise NotImplementedError

    def __call__(self, images, severity, normal=None, uniform=None):
        signs = torch.where(uniform[:, :, 0, 0, :2] < 0.5, -1.0, 1.0).to(torch.float64)  # [G, n, 2]
        half = torch.tensor([(images.shape[-1] - 1) / 2, (images.shape[-2] - 1) / 2], dtype=torch.float64)
        theta = self.matrices(severity.view(-1, 1).double(), signs, half.to(signs.device))
        flat = images.flatten(0, 1)
        grid = F.affine_grid(theta.flatten(0, 1).to(images.dtype), list(flat.shape), align_corners=True)
        warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return warped.view_as(images)


def _affine(a11, a12, a21, a22, shift_x=None, shift_y=None) -> torch.Tensor:
    zero = torch.zeros_like(a11)
    rows = [
        torch.stack([a11, a12, zero if shift_x is None else shift_x], dim=-1),
        torch.stack([a21, a22, zero if shift_y is None else shift_y], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


class Rotate(Affine):
    """Rotation about the centre, MNIST-C's ``rotate``, in a random direction per image.

    Severity: the angle in radians, at most π (MNIST-C's levels: 0.2 to 1).
    """

    name, unit, max_severity = "rotate", "the angle in radians", math.pi

    def matrices(self, severity, signs, half):
        angle = severity * signs[..., 0]
        return _affine(angle.cos(), -angle.sin(), angle.sin(), angle.cos())


class Shear(Affine):
    """Shear about the centre, MNIST-C's ``shear`` (scikit-image's ``AffineTransform(shear=a)`` of its time:
    A = [[1, −sin a], [0, cos a]]), in a random direction per image.

    Severity: the shear angle a in radians, at most 1.5 (MNIST-C's levels: 0.2 to 1).
    """

    name, unit, max_severity = "shear", "the shear angle in radians", 1.5

    def matrices(self, severity, signs, half):
        angle = severity * signs[..., 0]
        one = torch.ones_like(angle)
        return _affine(one, -angle.sin(), torch.zeros_like(angle), angle.cos())


class Scale(Affine):
    """The digit shrunk about the centre to 1 − s of its size, MNIST-C's ``scale`` (its inverse map scales by
    1 / (1 − s)).

    Severity: s in [0, 0.9], the fraction of its size the digit loses (MNIST-C's levels: 0.1 to 0.5).
    """

    name, unit, max_severity = "scale", "the fraction of its size the digit loses", 0.9

    def matrices(self, severity, signs, half):
        factor = (1 / (1 - severity)).expand_as(signs[..., 0])
        zero = torch.zeros_like(factor)
        return _affine(factor, zero, zero, factor)


class Translate(Affine):
    """A shift by t pixels along each axis, in a random direction per axis and image, MNIST-C's ``translate``.

    Severity: t in pixels of the image, at most 28 (MNIST-C's levels: 1 to 5).
    """

    name, unit, max_severity = "translate", "the shift along each axis in pixels", 28.0

    def matrices(self, severity, signs, half):
        shift = severity[..., None] * signs / half  # pixels in units of half the image (centre to edge pixel)
        one, zero = torch.ones_like(shift[..., 0]), torch.zeros_like(shift[..., 0])
        return _affine(one, zero, zero, one, shift[..., 0], shift[..., 1])


class Stripe(Corruption):
    """Inverted bands at the left and right edges, MNIST-C's ``stripe`` (which inverts 7 columns each side).

    Severity: the width of each band in columns, a whole number in [0, 14].
    """

    name, unit, max_severity, integer = "stripe", "the width of each inverted band in columns", 14.0, True

    def __call__(self, images, severity, normal=None, uniform=None):
        columns = torch.arange(images.shape[-1], device=images.device)
        width = severity.view(-1, 1, 1, 1, 1)
        band = (columns < width) | (columns >= images.shape[-1] - width)
        return torch.where(band, 1 - images, images)


GAUSSIAN = GaussianNoise()
BUILT_IN = {
    c.name: c
    for c in (
        GaussianNoise, UniformNoise, ImpulseNoise, ShotNoise, SpeckleNoise, GaussianBlur,
        Brightness, Contrast, Rotate, Shear, Scale, Translate, Stripe,
    )
}  # fmt: skip


def build(spec) -> Corruption:
    """A corruption from a config's value: an instance, or ``{"class_path": ..., "init_args": {...}}`` (a dict or a
    jsonargparse Namespace), or a class path alone; a bare class name (``ImpulseNoise``) is this module's.

    Raises:
        ValueError: naming the value and the corruptions there are.
    """
    if isinstance(spec, Corruption):
        return spec
    if hasattr(spec, "as_dict"):
        spec = spec.as_dict()
    if isinstance(spec, str):
        spec = {"class_path": spec}
    path = spec.get("class_path") if isinstance(spec, dict) else None
    cls = None
    if isinstance(path, str):
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or __name__), name)
        except (ImportError, AttributeError, ValueError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Corruption) and hasattr(cls, "name")):
        raise ValueError(
            f"Expected corruptions to be among {', '.join(c.__name__ for c in BUILT_IN.values())} (or the "
            f"class_path of a Corruption), but got {path or spec!r}"
        )
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict) or set(init_args) - {"severities"}:
        raise ValueError(f"Expected the init_args of {path} to be `severities` alone, but got {init_args!r}")
    return cls(**init_args)

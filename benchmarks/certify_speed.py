"""How fast is ``certify``? Certified images per second per member against the reference algorithm.

Times, interleaved (A B A B ...), on the same finished study, the same images, n0 and n:
  (A) ``certify``'s counting: every member side by side (``smoothing.Votes``), CERTIFY and PREDICT per member;
  (B) the reference implementation (locuslab/smoothing, ``code/core.py``, ``Smooth.certify``), ported
      line for line below: one model and one image at a time, ``x.repeat(batch)`` plus ``randn_like``
      noise, batches of its default 1000 noise samples (``certify.py --batch 1000``), counts with numpy.
Each prints member-images certified per second (images × members / seconds: for B, the images per second
of one model; for A, every member certifies that many divided by K at once), and A's speed-up over B.

    python benchmarks/certify_speed.py --study sweeps/smoothing_mlp --images 20
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, norm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noise_robustness.certify.certification import Setting, plan  # noqa: E402
from noise_robustness.certify.smoothing import Votes, certificate  # noqa: E402
from noise_robustness.data.datamodule import NoisyMNISTDataModule  # noqa: E402
from noise_robustness.engine.stacked import stack  # noqa: E402
from noise_robustness.evaluation import member_networks, subset  # noqa: E402


class ReferenceSmooth:
    """``Smooth`` of locuslab/smoothing ``code/core.py`` (CERTIFY only), for a model on [B, 1, 28, 28]."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float):
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int):
        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_a = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        n_a = counts_estimation[c_a].item()
        p_a = self._lower_confidence_bound(n_a, n, alpha)
        if p_a < 0.5:
            return ReferenceSmooth.ABSTAIN, 0.0
        return c_a, self.sigma * norm.ppf(p_a)

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(int(np.ceil(num / batch_size))):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=self.num_classes)
            return counts

    def _lower_confidence_bound(self, n_a: int, n: int, alpha: float) -> float:
        # statsmodels' proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0], without statsmodels
        return 0.0 if n_a == 0 else beta.ppf(alpha, n_a, n - n_a + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="a finished study (with its members' weights)")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--data_dir", default=str(REPO / "data"))
    args = parser.parse_args()
    setting = Setting(args.n0, args.n, 0.001, args.images, sigma=None)
    (certification,) = plan([args.study], setting)
    data = certification.study.resolved.get("data", {})
    datamodule = NoisyMNISTDataModule(data_dir=args.data_dir, val_holdout=data.get("val_holdout", 0))
    datamodule.prepare_data()
    datamodule.setup()
    file, indices = datamodule.splits["val"]
    picks = [int(indices[p]) for p in subset(datamodule.split_size("val"), args.images)]
    images = [datamodule.images[file][i].float().div(255) for i in picks]
    nets = member_networks(certification.study, certification.weights)
    members, sigmas = certification.members, certification.sigmas
    k = len(members)
    print(f"{certification.network}: {k} members, {args.images} images, n0 = {args.n0}, n = {args.n}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    def ours() -> float:
        votes = Votes(stack(nets, [m.seed for m in members]).eval(), [m.seed for m in members], sigmas, False,
                      torch.device("cpu"))  # fmt: skip
        start = time.perf_counter()
        for image, index in zip(images, picks):
            selection = votes.count(image, file, index, "selection", args.n0)
            estimation = votes.count(image, file, index, "estimation", args.n)
            for j in range(k):
                certificate(selection[j], estimation[j], 0.001, sigmas[j])
        return args.images * k / (time.perf_counter() - start)

    def reference() -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        for net, sigma in zip(nets, sigmas):
            smooth = ReferenceSmooth(net, 10, sigma)
            for image in images:
                smooth.certify(image, args.n0, args.n, 0.001, batch_size=1000)
        return args.images * k / (time.perf_counter() - start)

    rates = {"ours": [], "reference": []}
    for _ in range(args.pairs):
        rates["ours"].append(ours())
        rates["reference"].append(reference())
    for name, values in rates.items():
        print(f"{name:>9}: {statistics.median(values):7.2f} member-images certified per second "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["reference"])
    print(f"certify is {ratio:.2f}x the reference, one model and one image at a time (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()

"""Does keeping freed memory (``noise_robustness.engine.memory.tune_allocator``) pay on this machine? The main job's
training step (18 MLPs, a batch of 128, this machine's ``precision auto``) in two fresh processes, glibc's malloc
tuned and as it comes: page faults and milliseconds a step, 8 steps after 4 to warm up.

    python benchmarks/allocator.py

A measurement, not a test: page faults and times depend on the machine, its kernel and what else runs.
"""

import json
import os
import subprocess
import sys

from noise_robustness.engine.memory import SWITCH

PROBE = """
import json, resource, time
from noise_robustness.engine.memory import tune_allocator
done = tune_allocator()
import torch
from torch.nn import functional as F
from noise_robustness.training.classifier import NoiseClassifier
from noise_robustness.engine.precision import fast_precision
bf16 = fast_precision("cpu") == "bf16-mixed"
model = NoiseClassifier(scales=[0.0, 0.1, 0.5, 1.0, 2.0, 4.0], seeds=[0, 1, 2])
optimizer = model.configure_optimizers()
model.net.start_epoch(0, 0)
images, labels = torch.rand(18, 128, 1, 28, 28), torch.randint(10, (18, 128))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model.net(images).float().flatten(0, 1), labels.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(4):
    step()
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(8):
    step()
seconds = time.perf_counter() - start
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
print(json.dumps({"tuned": done, "faults": faults, "ms": 1000 * seconds / 8, "bf16": bf16}))
"""


def probe(**env: str) -> dict:
    """The probe's figures in a fresh process with ``env`` (and no malloc setting of the caller's)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


if __name__ == "__main__":
    runs = {"tuned": [], "as it comes": []}
    for _ in range(3):  # interleaved, so that a busy moment hurts both
        runs["tuned"].append(probe())
        runs["as it comes"].append(probe(**{SWITCH: "default"}))
    for name, results in runs.items():
        ms = sorted(r["ms"] for r in results)[1]
        faults = sorted(r["faults"] for r in results)[1]
        print(
            f"{name:12s} step {ms:6.1f} ms (median of 3)   page faults a step {faults:8.0f}   bf16 {results[0]['bf16']}"
        )

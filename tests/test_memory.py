"""The allocator setting of ``python -m noise_robustness`` (``noise_robustness.memory``), in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noise_robustness.memory import SWITCH, tune_allocator

# The main job's training step (18 MLPs, a batch of 128, bf16 autocast): its page faults a step, over 8 steps after 4.
PROBE = """
import json, resource
from noise_robustness.memory import tune_allocator
done = tune_allocator()
import torch
from torch.nn import functional as F
from noise_robustness.classifier import NoiseClassifier
model = NoiseClassifier(scales=[0.0, 0.1, 0.5, 1.0, 2.0, 4.0], seeds=[0, 1, 2])
optimizer = model.configure_optimizers()
model.net.start_epoch(0, 0)
images, labels = torch.rand(18, 128, 1, 28, 28), torch.randint(10, (18, 128))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model.net(images).float().flatten(0, 1), labels.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
print(json.dumps({"done": done, "faults": faults}))
"""


def probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux: glibc's malloc, page faults counted")
def test_freed_memory_is_reused_without_page_faults():
    tuned, as_it_comes = probe(), probe(**{SWITCH: "default"})
    assert tuned["done"] is True and as_it_comes["done"] is False
    # measured: 5,000-14,000 fresh 4 kB pages a step as glibc comes (freed memory trimmed, faulted in again); kept,
    # 0-800 (a step whose blocks do not fit the free ones grows the heap)
    assert as_it_comes["faults"] > 2_000 and tuned["faults"] < as_it_comes["faults"] / 5, (tuned, as_it_comes)


def test_a_users_own_malloc_settings_stand(monkeypatch):
    for name in [name for name in os.environ if name.startswith("MALLOC_")] + [SWITCH, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_allocator() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert tune_allocator() is True  # (this test process keeps freed memory from here on: the same numbers)

"""The allocator settings of ``python -m noise_robustness`` (``noise_robustness.memory``), in fresh processes: they
must come before torch is imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noise_robustness.memory import HUGE_PAGES, SWITCH, tune_allocator

# The main job's training step (18 MLPs, a batch of 128, bf16 autocast): its page faults a step, after 3 steps,
# and the huge pages the process holds.
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
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(json.dumps({"done": done, "faults": faults, "huge_kb": huge}))
"""


def probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != HUGE_PAGES and not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's /proc: page faults and huge pages")
def test_freed_memory_is_reused_without_page_faults_and_torch_takes_huge_pages():
    tuned, as_it_comes = probe(), probe(**{SWITCH: "default"})
    assert tuned["done"] == [f"{HUGE_PAGES}=1", "mallopt"] and as_it_comes["done"] == []
    # measured: ~8,000 fresh 4 kB pages a step as glibc comes (freed memory trimmed, faulted in again), ~15 tuned
    assert as_it_comes["faults"] > 2_000 and tuned["faults"] < 500, (tuned, as_it_comes)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert tuned["huge_kb"] >= 32 * 1024 > as_it_comes["huge_kb"], (tuned, as_it_comes)


def test_a_users_own_settings_stand_and_huge_pages_are_asked_for_before_torch_only(monkeypatch):
    """In this process torch is imported already: too late for huge pages, which torch decides once."""
    for name in [name for name in os.environ if name.startswith("MALLOC_")] + [HUGE_PAGES, SWITCH]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own malloc setting
    assert tune_allocator() == [] and HUGE_PAGES not in os.environ
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert tune_allocator() == ["mallopt"]

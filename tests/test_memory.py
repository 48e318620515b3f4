"""The allocator setting of ``python -m noise_robustness`` (``noise_robustness.engine.memory``)."""

import os

from noise_robustness.engine.memory import SWITCH, tune_allocator

# Whether keeping freed memory pays (page faults, step times) depends on the machine: benchmarks/allocator.py measures
# it. Here, what holds anywhere: it is set where it can be, and never over a user's own malloc settings.


def test_a_users_own_malloc_settings_stand(monkeypatch):
    for name in [name for name in os.environ if name.startswith("MALLOC_")] + [SWITCH, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_allocator() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert tune_allocator() is True  # (this test process keeps freed memory from here on: the same numbers)

"""Load-aware threads and handing freed memory back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from circuitmap import hardware


def test_busy_loop_beside_takes_a_thread_away_and_the_setting_comes_back():
    if (os.cpu_count() or 1) < 2 or not os.path.exists("/proc/stat"):
        pytest.skip("needs Linux and two cores")
    before = torch.get_num_threads()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert hardware.busy_cores_elsewhere(0.2) > 0.5
        with hardware.threads_for_load() as threads:
            assert 1 <= threads <= max(1, os.cpu_count() - 1)
            assert torch.get_num_threads() == threads
    finally:
        hog.kill()
        hog.wait()
    assert torch.get_num_threads() == before


def test_release_free_memory_runs_anywhere():
    hardware.release_free_memory()

"""Stopping in time: a deadline keeps one step and one save in reserve (measured), and
the configured timeout reaches Megatron's process groups, not only the default one."""

from datetime import timedelta

import pytest
import torch
from conftest import world_of_one

from megatron_pwdpo.platform.resilience import StopRequest


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_reserve_grows_with_the_measured_step_and_save():
    clock = Clock()
    stop = StopRequest(time_budget_s=None, job_end=1000.0 + 600, margin_s=30, clock=clock)
    assert stop.deadline == 1600.0 and stop.reserve_s() == 30
    stop.note_step(10)
    stop.note_save(100)
    stop.note_save(80)  # the longest save counts
    assert stop.reserve_s() == pytest.approx(1.5 * (10 + 100) + 30)  # 195 s
    clock.now = 1600 - 196
    assert not stop.over_time()
    clock.now = 1600 - 194  # one more step + save would overrun the job's end
    assert stop.over_time()
    assert "time limit" in stop.agreed(torch.device("cpu"))


def test_the_earlier_of_budget_and_job_end_wins_and_a_requeue_keeps_the_save_time():
    clock = Clock()
    stop = StopRequest(time_budget_s=100, job_end=5000.0, known_save_s=40, clock=clock)
    assert stop.deadline == 1100.0 and stop.reserve_s() == 1.5 * 40 + 30
    assert StopRequest(time_budget_s=None, clock=clock).over_time() is False


def test_job_end_comes_from_the_environment():
    assert StopRequest.job_end_from_env({"PWDPO_JOB_END_TIME": "1765000000"}) == 1765000000
    assert StopRequest.job_end_from_env({"PWDPO_JOB_END_TIME": ""}) is None
    assert StopRequest.job_end_from_env({}) is None


def test_megatron_groups_get_the_configured_timeout():
    from megatron.core import parallel_state as ps

    with world_of_one(timeout_s=125):
        groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            "dp": ps.get_data_parallel_group(),
            "embedding": ps.get_embedding_group(),
        }
        for name, group in groups.items():
            backend = group._get_backend(torch.device("cpu"))
            # 125 s rounded up to whole minutes (Megatron's unit); the default was 30 min
            assert backend.options._timeout == timedelta(minutes=3), name

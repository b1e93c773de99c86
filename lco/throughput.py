"""Training throughput and peak memory, measured over the optimizer steps alone (evaluation and saving excluded)."""

import resource
import sys
import time

from transformers import TrainerCallback


class Throughput(TrainerCallback):
    """Tokens per second over this run's steps but its first (which pays for warm-up), the share of the time spent
    waiting for batches (the Trainer fetches and collates a step's batches between one step's end and the next's
    begin; intervals with an evaluation or a save in them are left out), and peak memory.

    Needs `include_num_input_tokens_seen` on, so the Trainer counts every process's tokens."""

    def __init__(self):
        self.step_started = 0.0
        self.step_ended = None  # None: the interval since holds something other than fetching batches
        self.waiting_seconds = 0.0
        self.tokens_before = 0
        self.timed_seconds = 0.0
        self.timed_tokens = 0
        self.timed_steps = 0
        self.steps = 0  # every step this process trained, the first (untimed) one included
        self.warmed_up = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_before = state.num_input_tokens_seen  # not 0 when resuming

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()
        if self.warmed_up and self.step_ended is not None:
            self.waiting_seconds += self.step_started - self.step_ended

    def on_evaluate(self, args, state, control, **kwargs):
        self.step_ended = None

    def on_save(self, args, state, control, **kwargs):
        self.step_ended = None

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels finish inside its timed span
        seconds = time.perf_counter() - self.step_started
        tokens = state.num_input_tokens_seen - self.tokens_before
        self.tokens_before = state.num_input_tokens_seen
        self.step_ended = time.perf_counter()
        self.steps += 1
        if not self.warmed_up:
            self.warmed_up = True
        else:
            self.timed_seconds += seconds
            self.timed_tokens += tokens
            self.timed_steps += 1

    def summary(self) -> dict:
        import torch

        waited = self.waiting_seconds
        # ru_maxrss is KiB on Linux, bytes on macOS
        rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        result = {
            "timed_steps": self.timed_steps,
            "tokens_per_second": round(self.timed_tokens / self.timed_seconds, 1) if self.timed_seconds else None,
            "seconds_per_step": round(self.timed_seconds / self.timed_steps, 3) if self.timed_steps else None,
            "waiting_for_batches_share": round(waited / (waited + self.timed_seconds), 3) if self.timed_steps else None,
            "peak_host_memory_gib": round(rss_bytes / 2**30, 2),
        }
        if torch.cuda.is_available():
            result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["gpu"] = torch.cuda.get_device_name()
        return result

"""Counters in Prometheus' text format (`GET /metrics`): requests, tokens, errors, the engine's queue and batches."""

from __future__ import annotations

import threading


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.seconds = 0.0
        self.errors: dict[int, int] = {}

    def request(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.seconds += seconds

    def error(self, status: int) -> None:
        with self._lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def render(self, engine) -> str:
        lines = [
            "# TYPE softprompt_requests_total counter",
            f"softprompt_requests_total {self.requests}",
            "# TYPE softprompt_prompt_tokens_total counter",
            f"softprompt_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE softprompt_completion_tokens_total counter",
            f"softprompt_completion_tokens_total {self.completion_tokens}",
            "# TYPE softprompt_request_seconds_total counter",
            f"softprompt_request_seconds_total {self.seconds:.6f}",
            "# TYPE softprompt_errors_total counter",
            *(f'softprompt_errors_total{{status="{status}"}} {n}' for status, n in sorted(self.errors.items())),
        ]
        if engine is not None:
            stats = engine.stats
            lines += [
                "# TYPE softprompt_queue_waiting gauge",
                f"softprompt_queue_waiting {engine.waiting}",
                "# TYPE softprompt_batch_running_rows gauge",
                f"softprompt_batch_running_rows {stats.running}",
                "# TYPE softprompt_batches_total counter",
                f"softprompt_batches_total {stats.batches}",
                "# TYPE softprompt_batch_rows_total counter",
                f"softprompt_batch_rows_total {stats.rows}",
                "# TYPE softprompt_decode_steps_total counter",
                f"softprompt_decode_steps_total {stats.steps}",
            ]
        return "\n".join(lines) + "\n"

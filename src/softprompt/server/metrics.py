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

    def render(self, engines: dict) -> str:
        """The counters, and each export's engine (name -> engine, None for an encoder)."""
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
        running = {name: engine for name, engine in engines.items() if engine is not None}
        if running:
            gauges = [
                ("softprompt_queue_waiting", "gauge", lambda e: e.waiting),
                ("softprompt_batch_running_rows", "gauge", lambda e: e.stats.running),
                ("softprompt_batches_total", "counter", lambda e: e.stats.batches),
                ("softprompt_batch_rows_total", "counter", lambda e: e.stats.rows),
                ("softprompt_decode_steps_total", "counter", lambda e: e.stats.steps),
            ]
            for metric, kind, value in gauges:
                lines.append(f"# TYPE {metric} {kind}")
                # one export's unlabelled, as a one-model server has always said; several, one line each by model
                lines += [f"{metric}{_label(name, len(engines))} {value(e)}" for name, e in running.items()]
        return "\n".join(lines) + "\n"


def _label(name: str, exports: int) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return "" if exports == 1 else f'{{model="{escaped}"}}'

"""serve-model under load: 1, 4 and 16 concurrent clients of the real `openai` client, and 16 lean ones, each asking its own task.

The server runs in its own process on the default model's export with a bank of 16 tasks (the
shipped prompt, prefix and P-tuning tasks under 16 names). Every client streams its requests one
after another (greedy, --new-tokens each). For each number of clients: tokens/s over the run,
first-token and request latency p50/p95. The baseline, in the same run: the 16 clients' requests
served one at a time (one client), and the runtime's own batch of 16 rows of the 16 tasks in this
process. And one request by one client against the same request through the Python API in this
process (medians of --repeats). Every request decodes exactly --new-tokens (`min_tokens`: a
classification task would stop after its label).

The clients run on the server's machine, so whatever they burn the server loses: the `openai`
client parses every chunk (about a fifth of a core for 16 streams on a 2-core machine), which is
measured and printed (cores used) but is not the server's cost. The 16-client target is therefore
measured with lean clients (`lean_request`: the same requests over bare HTTP, a hundredth of a core),
as a load generator on its own machine would leave the server, and so is one client's latency; the
`openai` client's figures are printed beside them. Those two targets are medians of --repeats
rounds' ratios, each round running the lean clients, the runtime's batch and the single requests
(lean, `openai`, Python API) once, so that each ratio compares runs seconds apart.

    python -m bench.speed.serve_http --export exports/smollm2-int4 --bank banks/smollm2-135m

Targets: 16 clients >= 0.95x the throughput of the runtime's own batch of 16; one client's latency
within 5% of the Python API's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import machine
from bench.speed import methods

TEXTS = [*methods.TEXTS, "Committee, n.", "Deadline, n."]


def make_bank(source: Path, folder: Path, count: int) -> list[str]:
    """`count` tasks named t00.. cycling through the source bank's tasks (their vectors, templates and kinds)."""
    from softprompt.formats.bank import save_prefix, save_prompt
    from softprompt.prompt_bank import list_tasks, load_prompt

    names = list_tasks(source)
    made = []
    for i in range(count):
        prompt = load_prompt(source, names[i % len(names)])
        save = save_prefix if prompt.is_prefix else save_prompt
        save(folder, f"t{i:02d}", prompt.vectors, fingerprint=prompt.meta.fingerprint, extra=prompt.meta.extra)
        made.append(f"t{i:02d}")
    return made


def start_server(export: Path, bank: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "softprompt.server.cli", str(export), "--bank", str(bank), "--name", "m"]
    command += ["--port", str(port), "--threads", str(threads), "--max-batch", "16"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, url
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"serve-model exited: {process.stderr.read() if process.stderr else ''}") from None
            time.sleep(0.1)
    raise SystemExit("serve-model did not start in 60 s")


def one_request(client, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(first-token seconds, request seconds, tokens) of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=new_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": new_tokens},  # every request decodes its tokens (a classification task stops at a label)
    ):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process, or of `pid`: what the clients and the server each burn
    of the machine's cores while they share them."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def lean_request(url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """One streamed completion over a bare HTTP/1.0 connection (the server frames the body by closing it, so every
    SSE line arrives whole): what `one_request` measures, at some microseconds of the client's CPU per token instead
    of the `openai` client's parsing of every chunk, so that on a machine whose cores the clients share with the
    server the clients take next to nothing from it."""
    address = urllib.parse.urlsplit(url)
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = f"POST {address.path}/completions HTTP/1.0\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"serve-model answered {status.decode().strip()!r}: {(await reader.read()).decode()[:300]}")
    first = None
    tokens = 0
    async for line in reader:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def run_clients(
    url: str, tasks: list[str], clients: int, per_client: int, new_tokens: int, server: int, lean: bool = False
) -> dict:
    """`clients` clients, client i asking task i for `per_client` prompts in turn: threads of the `openai` client, or
    with `lean` coroutines of `lean_request`. Also the cores the clients (this process) and the server used."""

    def requests(i: int) -> list[tuple[str, str]]:
        return [(f"m:{tasks[i % len(tasks)]}", TEXTS[(i + j) % len(TEXTS)]) for j in range(per_client)]

    def client_run(i: int) -> list[tuple[float, float, int]]:
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        return [one_request(client, model, prompt, new_tokens) for model, prompt in requests(i)]

    async def lean_run(i: int) -> list[tuple[float, float, int]]:
        return [await lean_request(url, model, prompt, new_tokens) for model, prompt in requests(i)]

    async def lean_all() -> list[list[tuple[float, float, int]]]:
        return await asyncio.gather(*(lean_run(i) for i in range(clients)))

    start, own, served = time.perf_counter(), cpu_seconds(), cpu_seconds(server)
    if lean:
        per = asyncio.run(lean_all())
    else:
        with ThreadPoolExecutor(clients) as pool:
            per = list(pool.map(client_run, range(clients)))
    wall = time.perf_counter() - start
    own, served = cpu_seconds() - own, cpu_seconds(server) - served
    results = [r for rows in per for r in rows]
    firsts, totals = sorted(r[0] for r in results), sorted(r[1] for r in results)
    return {
        "clients": clients,
        "client": "lean" if lean else "openai",
        "requests": len(results),
        "tokens": sum(r[2] for r in results),
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "first_token_ms_p50": 1000 * percentile(firsts, 50),
        "first_token_ms_p95": 1000 * percentile(firsts, 95),
        "latency_ms_p50": 1000 * percentile(totals, 50),
        "latency_ms_p95": 1000 * percentile(totals, 95),
        "wall_s": wall,
        "clients_cores": own / wall,
        "server_cores": served / wall,
    }


def one_at_a_time(url: str, tasks: list[str], clients: int, per_client: int, new_tokens: int) -> dict:
    """The same requests as `clients` clients make, served one after another by one client."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    tokens = 0
    for i in range(clients):
        for j in range(per_client):
            tokens += one_request(client, f"m:{tasks[i % len(tasks)]}", TEXTS[(i + j) % len(TEXTS)], new_tokens)[2]
    return {"tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2-int4"))
    parser.add_argument("--bank", type=Path, default=Path("banks/smollm2-135m"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2, help="requests each client makes, one after another")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds of the 16 lean clients, the runtime's batch and single requests"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from openai import OpenAI

    from softprompt.runtime import load

    with tempfile.TemporaryDirectory() as scratch:
        tasks = make_bank(args.bank, Path(scratch), 16)
        # The Python API's side lives in this process and is measured between the server's runs, round by round, so
        # that each ratio compares measurements a few seconds apart on this (noisy, shared) machine.
        model = load(args.export, bank=Path(scratch), providers="cpu", threads=args.threads)

        def engine_batch() -> float:
            """Tokens/s of the runtime's own batch of the 16 clients' first requests, each row its own task."""
            start = time.perf_counter()
            done = model.complete(
                [TEXTS[i % len(TEXTS)] for i in range(16)],
                task=tasks[:16],
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
            )
            return sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)

        def direct() -> float:
            start = time.perf_counter()
            model.complete(TEXTS[1], task=tasks[1], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            return time.perf_counter() - start

        engine_batch()  # warm-up
        process, url = start_server(args.export, Path(scratch), args.threads)
        try:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            one_request(client, f"m:{tasks[0]}", TEXTS[0], 4)  # warm-up
            rows = [run_clients(url, tasks, n, args.per_client, args.new_tokens, process.pid) for n in (1, 4, 16)]
            baseline = one_at_a_time(url, tasks, 16, args.per_client, args.new_tokens)
            sides = {
                "lean": lambda: run_clients(url, tasks, 16, args.per_client, args.new_tokens, process.pid, lean=True),
                "engine": engine_batch,
                "served": lambda: asyncio.run(lean_request(url, f"m:{tasks[1]}", TEXTS[1], args.new_tokens))[1],
                "openai": lambda: one_request(client, f"m:{tasks[1]}", TEXTS[1], args.new_tokens)[1],
                "direct": direct,
            }
            measured: dict[str, list] = {name: [] for name in sides}
            for round_ in range(args.repeats):  # each round runs every side once, in an order that turns round by round
                names = list(sides)[round_ % len(sides) :] + list(sides)[: round_ % len(sides)]
                for name in names:
                    measured[name].append(sides[name]())
        finally:
            process.terminate()
            process.wait(60)
    lean_runs, engine = measured["lean"], measured["engine"]
    rows.append(sorted(lean_runs, key=lambda row: row["tokens_per_s"])[len(lean_runs) // 2])  # the median run
    served, through_openai = measured["served"], measured["openai"]
    print(f"serve-model, {args.export}, 16 tasks, {args.new_tokens} new tokens, {args.threads} threads; {machine()}")
    print("clients  client  requests  tokens/s  first-token p50/p95 ms  latency p50/p95 ms  cores used: clients / server")
    for row in rows:
        print(
            f"{row['clients']:7d}  {row['client']:6}  {row['requests']:8d}  {row['tokens_per_s']:8.1f}  "
            f"{row['first_token_ms_p50']:9.0f} / {row['first_token_ms_p95']:<9.0f}  "
            f"{row['latency_ms_p50']:7.0f} / {row['latency_ms_p95']:<7.0f}  "
            f"{row['clients_cores']:.2f} / {row['server_cores']:.2f}"
        )
    ratio = rows[-2]["tokens_per_s"] / baseline["tokens_per_s"]  # both through the openai client
    batched = statistics.median(run["tokens_per_s"] / rate for run, rate in zip(lean_runs, engine))  # per round
    with_openai = rows[-2]["tokens_per_s"] / statistics.median(engine)
    latency = statistics.median(a / b for a, b in zip(served, measured["direct"]))  # per round
    print(
        f"16 clients: {batched:.2f}x the runtime's own batch of 16 rows (median of {args.repeats} rounds' ratios; "
        f"{statistics.median(r['tokens_per_s'] for r in lean_runs):.1f} vs {statistics.median(engine):.1f} tok/s), target >= 0.95x; 16 openai clients on the same cores "
        f"{with_openai:.2f}x (they used {rows[-2]['clients_cores']:.2f} cores), {ratio:.2f}x the same requests one at a time "
        f"({baseline['tokens_per_s']:.1f} tok/s)"
    )
    print(
        f"one client: {1000 * statistics.median(served):.0f} ms per request (lean; openai's client "
        f"{1000 * statistics.median(through_openai):.0f} ms), the Python API {1000 * statistics.median(measured['direct']):.0f} ms: "
        f"{latency:.2f}x (median of {args.repeats} rounds' ratios); target <= 1.05x"
    )
    if args.json_out:
        record = {
            "rows": rows,
            "baseline": baseline,
            "engine_tokens_per_s": statistics.median(engine),
            "batch_ratio": batched,
            "batch_ratio_openai_clients": with_openai,
            "throughput_ratio": ratio,
            "latency_ratio": latency,
            "latency_ratio_openai_client": statistics.median(a / b for a, b in zip(through_openai, measured["direct"])),
            "machine": machine(),
        }
        args.json_out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

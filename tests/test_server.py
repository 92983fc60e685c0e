"""serve-model with the real `openai` client: completions, chat, streaming, classify, errors, keys, mixed tasks, hot swap."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load

from conftest import CONVERSATION, TEXTS, random_prompt

SPEC = TaskSpec(template="Review: {text} Sentiment:", labels={"positive": " good", "negative": " bad"})
KEY = "sk-test-0123456789"


def start(app):
    """Serve `app` on a free localhost port in a thread; returns (base url, stop)."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{port}", stop


def hold_after_first_text(engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make `engine` wait, once a row has text to show, until `go` is set (`holding` says it waits): the server has
    that text to send, and a test can act while the stream is known to run, however fast the machine decodes."""
    holding, go = threading.Event(), threading.Event()
    submit = engine.submit

    def held_submit(job):
        tell = job.on_step

        def on_step(state):
            tell(state)
            if state.stable_text() and not go.is_set():
                holding.set()
                go.wait(30)

        job.on_step = on_step
        submit(job)

    monkeypatch.setattr(engine, "submit", held_submit)
    return holding, go


@pytest.fixture(scope="module")
def served(chat_export, tmp_path_factory):
    """The chat-capable tiny llama with two prompt tasks, behind serve-model's app, with and without a key."""
    from softprompt.server import Limits, create_app

    _, export = chat_export
    bank = tmp_path_factory.mktemp("served-bank")
    fingerprint = json.loads((export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(bank, "a", random_prompt(3, 64, seed=1), fingerprint=fingerprint, extra=SPEC.to_extra())
    save_prompt(bank, "b", random_prompt(2, 64, seed=2), fingerprint=fingerprint)
    model = load(export, bank=bank, providers="cpu")
    limits = Limits(max_tokens=64, max_prompt_tokens=100, max_body_bytes=8192)
    url, stop = start(create_app(model, name="tiny", limits=limits))
    keyed_url, stop_keyed = start(create_app(model, name="tiny", api_key=KEY, limits=limits))
    yield model, bank, url, keyed_url
    stop()
    stop_keyed()


def http(method: str, url: str, body: bytes | dict | None = None) -> tuple[int, dict | str]:
    """A raw request (what no client library would send): status and the JSON (or text) answer."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models_completions_and_streams_give_the_python_api_s_outputs(served):
    model, _, url, _ = served
    api = client(url)
    assert [m.id for m in api.models.list().data] == ["tiny", "tiny:a", "tiny:b"]
    for task, name in ((None, "tiny"), ("a", "tiny:a"), ("b", "tiny:b")):
        want = model.complete(TEXTS[0], task=task, max_new_tokens=6)[0]
        got = api.completions.create(model=name, prompt=TEXTS[0], max_tokens=6)
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(model.encode(TEXTS[0], task))
        pieces = list(api.completions.create(model=name, prompt=TEXTS[0], max_tokens=6, stream=True))
        assert "".join(p.choices[0].text for p in pieces) == want.text
        assert pieces[-1].choices[0].finish_reason == want.finish_reason
    sampled = [api.completions.create(model="tiny:a", prompt=TEXTS[1], max_tokens=6, temperature=0.9, seed=3).choices[0].text]
    assert sampled[0] == model.complete(TEXTS[1], task="a", max_new_tokens=6, temperature=0.9, seed=3)[0].text
    stopped = api.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=20, stop=[want.text[:2] or "x"])
    assert stopped.choices[0].text == model.complete(TEXTS[0], max_new_tokens=20, stop=[want.text[:2] or "x"])[0].text


def test_chat_and_its_stream(served):
    model, _, url, _ = served
    api = client(url)
    want = model.chat(CONVERSATION, task="b", max_new_tokens=5)
    got = api.chat.completions.create(model="tiny:b", messages=CONVERSATION, max_tokens=5)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    chunks = list(
        api.chat.completions.create(
            model="tiny:b", messages=CONVERSATION, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_concurrent_requests_for_different_tasks_equal_each_alone(served):
    model, _, url, _ = served
    api = client(url)
    jobs = [(["tiny", "tiny:a", "tiny:b"][i % 3], TEXTS[i % len(TEXTS)]) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda job: api.completions.create(model=job[0], prompt=job[1], max_tokens=8).choices[0].text, jobs))
    for (name, text), answer in zip(jobs, got):
        task = name.partition(":")[2] or None
        assert answer == model.complete(text, task=task, max_new_tokens=8)[0].text
    _, metrics = http("GET", url + "/metrics")
    assert "softprompt_batches_total" in metrics and "softprompt_requests_total" in metrics


def test_classify_health_and_hot_swap(served):
    model, bank, url, _ = served
    _, got = http("POST", url + "/v1/classify", {"model": "tiny:a", "input": TEXTS[:2]})
    assert [d["label"] for d in got["data"]] == [r["label"] for r in model.classify(TEXTS[:2], task="a")]
    assert http("GET", url + "/health")[1]["status"] == "ok"
    fingerprint = model.config.fingerprint
    save_prompt(bank, "c", random_prompt(4, 64, seed=9), fingerprint=fingerprint)
    api = client(url)
    assert "tiny:c" in [m.id for m in api.models.list().data]
    answer = api.completions.create(model="tiny:c", prompt=TEXTS[2], max_tokens=5).choices[0].text
    assert answer == model.complete(TEXTS[2], task="c", max_new_tokens=5)[0].text


def test_errors_are_openai_error_objects(served):
    _, _, url, keyed_url = served
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="model 'tiny:nope' does not exist"):
        api.completions.create(model="tiny:nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens 999; the limit is 64"):
        api.completions.create(model="tiny", prompt="x", max_tokens=999)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model="tiny", prompt="x", max_tokens=2, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="the prompt has .* tokens; the limit is 100"):
        api.completions.create(model="tiny", prompt="word " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n is 2"):
        api.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        api.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=2)
    status, body = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True})
    assert status == 400 and body["error"]["param"] == "echo"
    status, body = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"})
    assert status == 400 and body["error"]["param"] == "stream"
    status, bad = http("POST", url + "/v1/completions", b"{not json")
    assert status == 400 and bad["error"]["type"] == "invalid_request_error" and "not JSON" in bad["error"]["message"]
    status, big = http("POST", url + "/v1/completions", b" " * 9000)
    assert status == 413 and "limit" in big["error"]["message"]
    status, wrong = http("POST", url + "/v1/classify", {"model": "tiny:a", "input": [3]})
    assert status == 400 and wrong["error"]["param"] == "input"
    with pytest.raises(openai.AuthenticationError):
        client(keyed_url, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(keyed_url, key="wrong").models.list()
    assert client(keyed_url, key=KEY).completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


def test_a_full_queue_is_refused_and_closing_finishes_what_runs(served):
    from softprompt.runtime.engine import Engine, Job, QueueFull
    from softprompt.runtime.settings import GenerationSettings

    model = served[0]
    done = []
    engine = Engine(model, max_batch=4, max_queue=2)
    settings = GenerationSettings(max_new_tokens=3)
    jobs = [Job(model.encode(TEXTS[0]), None, settings, lambda s: None, done.append, lambda e: done.append(e)) for _ in range(3)]
    engine._lock.acquire()  # hold the engine so the queue fills
    try:
        engine._waiting.extend(jobs[:2])
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            engine.submit(jobs[2])
    finally:
        engine._lock.notify()
        engine._lock.release()
    engine.close(timeout=60)
    assert len(done) == 2 and all(d.ids == done[0].ids and len(d.ids) == 3 for d in done)


def test_a_request_joins_the_running_batch_and_leaves_when_done(served):
    """Continuous batching: B arrives while A decodes, runs beside it and finishes first; each gives its tokens alone."""
    from softprompt.runtime.engine import Engine, Job
    from softprompt.runtime.settings import GenerationSettings

    model = served[0]
    engine = Engine(model, max_batch=4)
    order, steps, started, submitted = [], {"a": 0}, threading.Event(), threading.Event()

    def counting(state):  # on the engine's thread: A's third step holds it until B is queued (a tiny model's
        steps["a"] += 1  # 27 remaining steps could otherwise end before this thread is scheduled to submit B)
        if steps["a"] == 3:
            started.set()
            assert submitted.wait(60)

    long = GenerationSettings(max_new_tokens=30, min_new_tokens=30)
    short = GenerationSettings(max_new_tokens=4, temperature=0.8, seed=5)
    results = {}
    a = Job(model.encode(TEXTS[0], "a"), "a", long, counting, lambda s: (order.append("a"), results.update(a=s)), print)
    b = Job(model.encode(TEXTS[1], "b"), "b", short, lambda s: None, lambda s: (order.append("b"), results.update(b=s)), print)
    engine.submit(a)
    assert started.wait(60)
    engine.submit(b)
    submitted.set()
    engine.close(timeout=120)
    assert order == ["b", "a"] and engine.stats.batches == 2  # b was admitted on its own, into the running batch
    assert results["a"].ids == model.complete(TEXTS[0], task="a", settings=long)[0].token_ids
    assert results["b"].ids == model.complete(TEXTS[1], task="b", settings=short)[0].token_ids


def test_embeddings_of_an_encoder_export(tmp_path):
    """An encoder export serves /v1/embeddings (the embed of the Python API) and classify, and refuses completions."""
    from test_encoder import make_bert

    from softprompt.exporter import export_model
    from softprompt.server import create_app

    export_model(str(make_bert(tmp_path / "bert")), tmp_path / "export", log=lambda m: None)
    model = load(tmp_path / "export", providers="cpu")
    url, stop = start(create_app(model, name="bert"))
    try:
        api = client(url)
        got = api.embeddings.create(model="bert", input=["a gorgeous film", "dull"])
        want = model.embed(["a gorgeous film", "dull"])
        assert [d.index for d in got.data] == [0, 1]
        assert max(abs(a - b) for d, w in zip(got.data, want) for a, b in zip(d.embedding, w)) < 1e-6
        floats = api.embeddings.create(model="bert", input="dull", encoding_format="float").data[0].embedding
        assert max(abs(a - b) for a, b in zip(floats, want[1])) < 1e-6
        with pytest.raises(openai.BadRequestError, match="bert is an encoder"):
            api.completions.create(model="bert", prompt="x", max_tokens=2)
        width = model.config.hidden_size
        assert len(api.embeddings.create(model="bert", input="dull", dimensions=width).data[0].embedding) == width
        with pytest.raises(openai.BadRequestError, match=f"dimensions 8; this model's embeddings have {width}"):
            api.embeddings.create(model="bert", input="dull", dimensions=8)  # never a silently cut vector
    finally:
        stop()


def test_a_client_that_disconnects_mid_stream_frees_its_row(served, monkeypatch):
    """The engine waits after the first text until the client has gone and the server has had time to notice, so
    the row must leave long before its 100 tokens."""
    from urllib.parse import urlparse

    from softprompt.server import create_app

    model = served[0]
    assert model.complete(TEXTS[0], max_new_tokens=100)[0].finish_reason == "length"  # it would run all 100 steps
    app = create_app(model, name="tiny")
    url, stop = start(app)
    holding, go = hold_after_first_text(app.state.engine, monkeypatch)
    try:
        address = urlparse(url)
        body = json.dumps({"model": "tiny", "prompt": TEXTS[0], "max_tokens": 100, "stream": True}).encode()
        with socket.create_connection((address.hostname, address.port)) as connection:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            connection.sendall(head.encode() + body)
            received = b""
            while b"data: " not in received:  # the stream has begun
                chunk = connection.recv(4096)
                assert chunk, received
                received += chunk
        assert holding.wait(30)
        time.sleep(0.5)  # the server notices the closed connection
        go.set()
        engine = app.state.engine
        deadline = time.time() + 30
        while engine.stats.running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats.running == 0 and engine.stats.steps < 90, engine.stats  # it left well before its 100 tokens
    finally:
        go.set()
        stop()


def test_shutting_down_lets_a_running_stream_finish(served, monkeypatch):
    """Graceful shutdown: told to stop (what uvicorn's SIGTERM handler does) while a stream runs, the server sends
    that stream to its end before it stops. The engine waits after the first text, so the stream is still running
    when the stop comes, however fast the machine decodes."""
    from softprompt.server import create_app

    model = served[0]
    want = model.complete(TEXTS[0], max_new_tokens=100)[0]
    assert want.finish_reason == "length"  # it runs all 100 steps
    app = create_app(model, name="tiny")
    url, stop = start(app)
    engine = app.state.engine
    holding, go = hold_after_first_text(engine, monkeypatch)
    stopping = threading.Thread(target=stop)
    try:
        stream = client(url).completions.create(model="tiny", prompt=TEXTS[0], max_tokens=100, stream=True)
        pieces = [next(iter(stream))]  # the stream has begun
        assert holding.wait(30)
        stopping.start()
        time.sleep(0.5)
        assert stopping.is_alive()  # stopping, and waiting for the stream
        go.set()
        pieces += list(stream)
        assert "".join(p.choices[0].text for p in pieces) == want.text and pieces[-1].choices[0].finish_reason == "length"
        stopping.join(30)
        assert not stopping.is_alive() and engine.stats.running == 0
    finally:
        go.set()
        if not stopping.is_alive() and stopping.ident is None:
            stop()


def test_a_list_of_prompts_gets_a_choice_each(served):
    model, _, url, _ = served
    api = client(url)
    want = [model.complete(text, task="a", max_new_tokens=6)[0] for text in TEXTS[:3]]
    got = api.completions.create(model="tiny:a", prompt=TEXTS[:3], max_tokens=6)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    pieces: dict[int, str] = {}
    for chunk in api.completions.create(model="tiny:a", prompt=TEXTS[:3], max_tokens=6, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
    assert pieces == {i: w.text for i, w in enumerate(want)}
    with pytest.raises(openai.BadRequestError, match="expected a string or a list of strings"):
        api.completions.create(model="tiny:a", prompt=[], max_tokens=2)


def test_the_openai_surface_a_client_meets(served):
    """models.retrieve, OpenAI-shaped 404s for unknown routes, and fields this server cannot honour refused."""
    _, _, url, _ = served
    api = client(url)
    assert api.models.retrieve("tiny:a").id == "tiny:a" and api.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="model 'tiny:nope' does not exist"):
        api.models.retrieve("tiny:nope")
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/engines/tiny/completions"), ("GET", "/v1/completions")):
        status, body = http(method, url + path, {} if method == "POST" else None)
        assert status in (404, 405) and body["error"]["type"] == "invalid_request_error" and path in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="response_format is not supported"):
        api.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=2, response_format={"type": "json_object"})
    plain = api.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=2, response_format={"type": "text"})
    assert plain.choices[0].message.content is not None


def test_a_classification_task_completes_with_one_label(served):
    """NAME:TASK of a classification task answers a completion with a label, not the label until max_tokens."""
    model, _, url, _ = served
    got = client(url).completions.create(model="tiny:a", prompt=TEXTS[0], max_tokens=40)
    longest = max(len(model.backbone.encode(words, add_special_tokens=False)) for words in SPEC.labels.values())
    assert got.choices[0].finish_reason == "stop" and got.usage.completion_tokens <= longest
    assert got.choices[0].text == model.complete(TEXTS[0], task="a", max_new_tokens=40)[0].text
    # min_tokens (vLLM's name) holds the end off as the runtime's min_new_tokens does: the same tokens
    held = client(url).completions.create(model="tiny:a", prompt=TEXTS[0], max_tokens=12, extra_body={"min_tokens": 12})
    want = model.complete(TEXTS[0], task="a", max_new_tokens=12, min_new_tokens=12)[0]
    assert held.usage.completion_tokens == 12 == len(want.token_ids) and held.choices[0].text == want.text
    for bad, message in ((13, "min_tokens 13 is above max_tokens 12"), (-1, "min_tokens is -1"), ("3", "min_tokens is '3'")):
        with pytest.raises(openai.BadRequestError, match=message):
            client(url).completions.create(model="tiny:a", prompt=TEXTS[0], max_tokens=12, extra_body={"min_tokens": bad})


def test_serve_model_says_what_it_serves_logs_each_request_and_refuses_a_busy_port(chat_export, tmp_path):
    """The command itself: a busy port is one error line and exit 1; the start lines name precision, threads and
    tasks (and a task that failed to load); each request is one log line."""
    import subprocess
    import sys

    _, export = chat_export
    bank = tmp_path / "bank"
    fingerprint = json.loads((export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(bank, "a", random_prompt(3, 64, seed=1), fingerprint=fingerprint, extra=SPEC.to_extra())
    save_prompt(bank, "wide", random_prompt(3, 8, seed=1), fingerprint=fingerprint)  # another model's width
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "softprompt.server.cli", str(export), "--bank", str(bank), "--port", str(port)]
        ran = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 1 and ran.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
        assert len(ran.stderr.strip().splitlines()) == 1
    server = subprocess.Popen(command + ["--threads", "1", "--name", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and http_ok(f"http://127.0.0.1:{port}/health") is None:
            time.sleep(0.2)
        answer = client(f"http://127.0.0.1:{port}").completions.create(model="tiny:a", prompt=TEXTS[0], max_tokens=3)
        http("GET", f"http://127.0.0.1:{port}/v1/nothing")
    finally:
        server.terminate()
        err = server.communicate(timeout=60)[1]
    assert "serving tiny (LlamaForCausalLM, fp32, CPUExecutionProvider, threads: 1)" in err
    assert "tasks (1), each as tiny:TASK: a" in err and "not served (see the warnings above): wide" in err
    assert "warning: task 'wide' failed to load" in err
    tokens = answer.usage.completion_tokens
    assert re.search(rf"info: POST /v1/completions tiny:a 200 {tokens} tokens \d+ ms", err), err
    assert re.search(r"info: GET /v1/nothing - 404 - \d+ ms", err), err
    assert "Traceback" not in err


def http_ok(url: str):
    try:
        return http("GET", url)
    except OSError:
        return None


def test_two_exports_in_one_server_each_serve_their_own_tasks(chat_export, gpt2_export, tmp_path):
    """Two backbones behind one server: a request goes to the export its model id names, with that export's tasks,
    and answers as that export alone does, also when requests for both run at once; an id naming neither export,
    or one export's task under the other's name, is a 404 listing every model id."""
    from softprompt.server import create_app

    _, llama_folder = chat_export
    banks = {}
    for name, folder, task in (("llama", llama_folder, "a"), ("gpt2", gpt2_export, "g")):
        config = json.loads((folder / "softprompt.json").read_text())
        banks[name] = tmp_path / name
        save_prompt(banks[name], task, random_prompt(3, config["hidden_size"], seed=4), fingerprint=config["fingerprint"])
    models = {
        "llama": load(llama_folder, bank=banks["llama"], providers="cpu"),
        "gpt2": load(gpt2_export, bank=banks["gpt2"], providers="cpu"),
    }
    app = create_app(models)
    url, stop = start(app)
    try:
        api = client(url)
        assert sorted(m.id for m in api.models.list().data) == ["gpt2", "gpt2:g", "llama", "llama:a"]
        asks = [("llama:a", TEXTS[0]), ("gpt2:g", TEXTS[1]), ("gpt2", TEXTS[2]), ("llama", TEXTS[3])] * 2
        want = [
            models[m.split(":")[0]].complete(text, task=m.partition(":")[2] or None, max_new_tokens=6)[0].text for m, text in asks
        ]
        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(lambda ask: api.completions.create(model=ask[0], prompt=ask[1], max_tokens=6), asks))
        assert [g.choices[0].text for g in got] == want and [g.model for g in got] == [m for m, _ in asks]
        for wrong in ("gpt2:a", "other", "other:g"):
            status, answer = http("POST", url + "/v1/completions", {"model": wrong, "prompt": "x", "max_tokens": 2})
            assert status == 404 and answer["error"]["code"] == "model_not_found", (wrong, answer)
            assert "llama:a" in answer["error"]["message"] and "gpt2:g" in answer["error"]["message"]
        status, answer = http("GET", url + "/v1/models/gpt2:g")
        assert status == 200 and answer["id"] == "gpt2:g"
        assert http("GET", url + "/health")[1] == {"status": "ok", "tasks": 2, "models": {"llama": 1, "gpt2": 1}}
        metrics = http("GET", url + "/metrics")[1]
        assert 'softprompt_batches_total{model="llama"}' in metrics and 'softprompt_batches_total{model="gpt2"}' in metrics
        assert re.search(r"softprompt_requests_total 8\b", metrics), metrics
        assert set(app.state.engines) == {"llama", "gpt2"}
    finally:
        stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["A", "B", "--bank", "x"], "--bank given 1 times for 2 exports; give it once per export"),
        (["A", "B", "--name", "m", "--name", "n", "--name", "o"], "--name given 3 times for 2 exports"),
        (["one/m", "two/m"], "two exports would both be m; name each with --name"),
        (["A", "--name", "a:b"], "model name 'a:b': expected a non-empty name without ':'"),
    ],
)
def test_serve_model_pairs_banks_and_names_with_exports_or_says_how(argv, message, capsys):
    from softprompt.server.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--port", "1"])
    assert exc.value.code == 2 and message in capsys.readouterr().err

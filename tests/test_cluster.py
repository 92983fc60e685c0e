"""On Ray, with a local instance this module starts: serve-model's app on Ray Serve replicas (the real `openai`
client against Ray's proxy), and datasets (JSONL, Parquet) classified, generated, chatted and embedded by Ray Data
workers, each row equal to the Python API's answer."""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from test_server import client, http

from softprompt.cluster.cli import main as cluster_main
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load
from softprompt.runtime.batch_file import run_file
from softprompt.runtime.chat import user_turn

from conftest import CONVERSATION, TEXTS, random_prompt

SPEC = TaskSpec(template="Review: {text} Sentiment:", labels={"positive": " good", "negative": " bad"})
KEY = "sk-cluster-test"


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance on this machine for this module: 4 logical CPUs (two workers and Ray's readers fit)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(chat_export, tmp_path_factory):
    """The chat-capable tiny llama's export and a bank of two tasks (one with labels), and the model loaded here."""
    _, export = chat_export
    bank = tmp_path_factory.mktemp("cluster-bank")
    fingerprint = json.loads((export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(bank, "a", random_prompt(3, 64, seed=1), fingerprint=fingerprint, extra=SPEC.to_extra())
    save_prompt(bank, "b", random_prompt(2, 64, seed=2), fingerprint=fingerprint)
    return export, bank, load(export, bank=bank, providers="cpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_folder(folder: Path) -> list[dict]:
    """Every row of a folder of JSONL result files, files in name order."""
    files = sorted(folder.glob("*.jsonl"))
    assert files, f"no .jsonl files in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def test_two_serve_replicas_answer_the_openai_client_as_the_python_api_and_follow_the_bank(local_ray, tiny):
    from ray import serve

    from softprompt.cluster import build

    export, bank, model = tiny
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The builder `serve run softprompt.cluster:build ...` uses: cluster-model serve's options as strings.
    app = build({"export_dir": str(export), "bank": str(bank), "name": "tiny", "replicas": "2", "api_key": KEY})
    serve.run(app, name="softprompt", route_prefix="/")
    try:
        status = serve.status().applications["softprompt"].deployments["softprompt"]
        assert status.replica_states == {"RUNNING": 2}
        url = f"http://127.0.0.1:{port}"
        api = client(url, KEY)
        with pytest.raises(openai.AuthenticationError):  # the key is checked behind Ray's proxy too
            client(url, "wrong").models.list()
        assert [m.id for m in api.models.list().data] == ["tiny", "tiny:a", "tiny:b"]
        jobs = [(["tiny", "tiny:a", "tiny:b"][i % 3], TEXTS[i % len(TEXTS)]) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda job: api.completions.create(model=job[0], prompt=job[1], max_tokens=6), jobs))
        for (name, text), answer in zip(jobs, got):
            want = model.complete(text, task=name.partition(":")[2] or None, max_new_tokens=6)[0]
            assert answer.choices[0].text == want.text and answer.usage.completion_tokens == len(want.token_ids)
        want = model.chat(CONVERSATION, task="b", max_new_tokens=5).text
        chunks = api.chat.completions.create(model="tiny:b", messages=CONVERSATION, max_tokens=5, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        # A task copied into the bank folder is served by every replica from its next request.
        save_prompt(bank, "c", random_prompt(4, 64, seed=9), fingerprint=model.config.fingerprint)
        model.reload()
        want = model.complete(TEXTS[2], task="c", max_new_tokens=5)[0].text
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: api.completions.create(model="tiny:c", prompt=TEXTS[2], max_tokens=5).choices[0].text, range(8)
                )
            )
        assert answers == [want] * 8
        status, body = http("POST", url + "/v1/completions", {"model": "tiny:nope", "prompt": "x"})
        assert status == 401  # no key: refused before the model is looked up
    finally:
        serve.delete("softprompt")
        (bank / "c.json").unlink()
        model.reload()


def test_a_jsonl_dataset_generates_in_order_as_run_model_does(local_ray, tiny, tmp_path):
    export, bank, model = tiny
    rows = [{"text": text, "id": i} for i, text in enumerate(TEXTS * 3)]
    rows[4]["task"] = "b"  # a row's own task; the others take --task's
    rows[7]["task"] = None  # null: the default task, as an absent field (columnar files cannot tell them apart)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(export), "--bank", str(bank), "--task", "a", "--max-new-tokens", "5"]
    args += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--workers", "2", "--batch-size", "3"]
    assert cluster_main(["run", *args]) == 0
    got = read_folder(tmp_path / "out")
    assert [r["id"] for r in got] == list(range(len(rows)))
    # The same file through run-model --input gives the same results (run-model adds line numbers).
    run_file(model, tmp_path / "in.jsonl", tmp_path / "alone.jsonl", mode="generate", task="a", settings={"max_new_tokens": 5})
    alone = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]
    for mine, theirs, row in zip(got, alone, rows):
        assert (mine["output"], mine["token_ids"], mine["finish_reason"]) == (
            theirs["output"],
            theirs["token_ids"],
            theirs["finish_reason"],
        )
        assert mine["task"] == (row.get("task") or "a") and mine["text"] == row["text"]
    assert cluster_main(["run", *args]) == 1  # the output folder exists: nothing is overwritten


def test_a_parquet_dataset_is_classified_with_one_schema(local_ray, tiny, tmp_path):
    export, bank, model = tiny
    texts = TEXTS * 2
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "in.parquet")
    args = ["run", str(export), "--bank", str(bank), "--task", "a", "--classify", "--input", str(tmp_path / "in.parquet")]
    assert cluster_main([*args, "--output", str(tmp_path / "out"), "--batch-size", "3"]) == 0
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("scores").type == pa.map_(pa.string(), pa.float64())
    got = table.to_pylist(maps_as_pydicts="strict")
    assert [r["n"] for r in got] == list(range(len(texts)))
    for row, want in zip(got, model.classify(texts, task="a")):
        assert row["label"] == want["label"] and row["task"] == "a"
        assert row["scores"].keys() == want["scores"].keys()
        assert all(abs(row["scores"][k] - want["scores"][k]) < 1e-6 for k in want["scores"])
    # The same rows written as JSON lines: the scores an object, as run-model --output writes them.
    assert cluster_main([*args, "--output", str(tmp_path / "as-json"), "--output-format", "jsonl"]) == 0
    assert read_folder(tmp_path / "as-json")[0]["scores"].keys() == model.classify(texts[0], task="a")[0]["scores"].keys()


def test_chats_run_from_messages_or_text(local_ray, tiny, tmp_path):
    export, bank, model = tiny
    rows = [{"messages": CONVERSATION}, {"text": " Hi? "}, {"messages": CONVERSATION[:2], "task": "a"}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["run", str(export), "--bank", str(bank), "--task", "b", "--chat", "--system", "Be brief.", "--max-new-tokens", "4"]
    assert cluster_main([*args, "--input", str(tmp_path / "chats.jsonl"), "--output", str(tmp_path / "out")]) == 0
    got = read_folder(tmp_path / "out")
    wants = [
        model.chat(CONVERSATION, task="b", max_new_tokens=4),
        model.chat(user_turn(" Hi? ", "Be brief."), task="b", max_new_tokens=4),
        model.chat(CONVERSATION[:2], task="a", max_new_tokens=4),
    ]
    assert [(r["output"], r["token_ids"]) for r in got] == [(w.text, w.token_ids) for w in wants]


def test_an_encoder_export_embeds_a_dataset(local_ray, tmp_path):
    from test_encoder import make_bert

    from softprompt.exporter import export_model

    export_model(str(make_bert(tmp_path / "bert")), tmp_path / "export", log=lambda m: None)
    model = load(tmp_path / "export", providers="cpu")
    texts = ["a gorgeous film", "dull", "the app crashes every time"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    args = ["run", str(tmp_path / "export"), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    assert cluster_main(args) == 0
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    for row, want in zip(table.to_pylist(), model.embed(texts)):
        assert max(abs(a - b) for a, b in zip(row["embedding"], want)) < 1e-5
    assert cluster_main([*args[:-1], str(tmp_path / "chat-out"), "--chat"]) == 1  # an encoder cannot chat


def test_bad_input_is_one_error_line(local_ray, tiny, tmp_path, capsys):
    export, bank, _ = tiny
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"words": "no text field"}\n')
    base = ["run", str(export), "--bank", str(bank)]
    assert cluster_main([*base, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]) == 1
    assert 'no "text" string in {"words": "no text field"}' in capsys.readouterr().err
    (tmp_path / "in.csv").write_text("text\nx\n")
    assert cluster_main([*base, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o2")]) == 1
    assert "in.csv is a .csv; expected .jsonl or .parquet" in capsys.readouterr().err
    assert cluster_main([*base, "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o3")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cluster_main([*base, "--task", "a", "--classify", "--chat", "--input", "x.jsonl", "--output", "o"])
    assert "--chat and --classify do not go together" in capsys.readouterr().err

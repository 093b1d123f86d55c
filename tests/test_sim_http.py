"""The simulator as a real process on 127.0.0.1: OpenAI SDK, SSE shape, errors, dialect endpoints, metrics."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import FIXTURES, Proc, free_port, http_get, spawn

MODEL = "sim/model-a"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    port = free_port()
    args = ["sim", "--dialect", "vllm", "--model", MODEL, "--port", str(port), "--id", "alpha", "--instant"]
    with spawn(args, port=port, log_dir=tmp_path_factory.mktemp("sim")) as proc:
        yield proc


def post(url: str, body: bytes | dict, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_openai_sdk_sync_plain_and_streaming(sim: Proc) -> None:
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="none", max_retries=0, timeout=10)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=5
    )
    assert raw.headers["x-sim-replica-id"] == "alpha"
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content, "the same prompt gets the same answer"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3)
    assert completion.object == "text_completion" and completion.usage is not None
    assert completion.usage.completion_tokens == 3
    emb = client.embeddings.create(model=MODEL, input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0


async def test_openai_sdk_async_plain_and_streaming(sim: Proc) -> None:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="none", max_retries=0, timeout=10)
    try:
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "async hello"}], max_completion_tokens=7
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 7
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "async hello"}], max_tokens=7, stream=True
        )
        finish = None
        content = ""
        async for chunk in stream:
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert content == reply.choices[0].message.content
    finally:
        await client.close()


def test_sse_stream_is_shaped_like_the_vllm_fixture(sim: Proc) -> None:
    fixture = sse_events((FIXTURES / "sse" / "vllm_chat_stream_ASSEMBLED.txt").read_bytes())
    status, headers, raw = post(
        sim.url + "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "shape"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    ours = sse_events(raw)
    assert ours[-1] == fixture[-1] == "[DONE]"
    theirs_docs = [json.loads(e) for e in fixture[:-1]]
    our_docs = [json.loads(e) for e in ours[:-1]]

    def kinds(docs: list[dict]) -> list[tuple]:
        out = []
        for doc in docs:
            if not doc["choices"]:
                out.append(
                    (
                        "usage",
                        tuple(sorted(doc)),
                        tuple(sorted(set(doc["usage"]) - {"prompt_tokens_details"})),
                    )
                )
            else:
                choice = doc["choices"][0]
                out.append(
                    ("choice", tuple(sorted(doc)), tuple(sorted(choice)), tuple(sorted(choice["delta"])))
                )
        return out

    theirs, mine = kinds(theirs_docs), kinds(our_docs)
    assert mine[0] == theirs[0], "role chunk first"
    assert our_docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert mine[1] == theirs[1], "content chunks"
    assert mine[-2] == theirs[-2], "final chunk with finish_reason and stop_reason"
    assert mine[-1] == theirs[-1], "usage chunk with choices []"
    assert our_docs[-2]["choices"][0]["finish_reason"] == "stop", "no max_tokens: the answer ends with EOS"
    assert len({d["id"] for d in our_docs}) == 1
    assert all(d["object"] == "chat.completion.chunk" for d in our_docs)
    usage = our_docs[-1]["usage"]
    assert usage["completion_tokens"] == 16, "--default-max-tokens"
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    _, _, plain = post(sim.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "shape"}]})
    assert (
        "".join(d["choices"][0]["delta"].get("content", "") for d in our_docs[:-1])
        == json.loads(plain)["choices"][0]["message"]["content"]
    )


def test_errors_use_the_engine_shape_and_unknown_fields_are_ignored(sim: Proc) -> None:
    status, headers, body = post(sim.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and headers["x-sim-replica-id"] == "alpha"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    status, _, body = post(
        sim.url + "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user"}]}
    )
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    status, _, body = post(
        sim.url + "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "frobnicate": {"a": 1},
        },
    )
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    status, _, body = post(
        sim.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999},
    )
    assert status == 400 and "maximum context length" in json.loads(body)["error"]["message"]
    status, raw_headers = _get_status_headers(sim.url + "/no/such/path")
    assert status == 404 and raw_headers["x-sim-replica-id"] == "alpha"


def _get_status_headers(url: str) -> tuple[int, dict[str, str]]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/" + url.removeprefix("http://").split("/", 1)[1])
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_repeated_prompt_hits_the_prefix_cache_and_counts_in_metrics(sim: Proc) -> None:
    _, before = http_get(sim.url + "/metrics")
    prompt = "A long shared system prompt about prefix caches. " * 40
    request = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    first = json.loads(post(sim.url + "/v1/chat/completions", request)[2])["usage"]
    second = json.loads(post(sim.url + "/v1/chat/completions", request)[2])["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.9 * second["prompt_tokens"] and cached % 16 == 0
    _, after = http_get(sim.url + "/metrics")
    hits = metric(after.decode(), "vllm:prefix_cache_hits_total") - metric(
        before.decode(), "vllm:prefix_cache_hits_total"
    )
    queries = metric(after.decode(), "vllm:prefix_cache_queries_total") - metric(
        before.decode(), "vllm:prefix_cache_queries_total"
    )
    assert hits == cached
    assert queries == first["prompt_tokens"] + second["prompt_tokens"]
    _, stats = http_get(sim.url + "/sim/stats")
    doc = json.loads(stats)
    assert doc["id"] == "alpha" and doc["prefix_hits_tokens"] >= cached
    assert set(doc) >= {
        "id",
        "requests_total",
        "running",
        "waiting",
        "aborted_total",
        "completed_total",
        "kv_blocks_used",
        "prefix_queries_tokens",
        "prefix_hits_tokens",
    }


def test_sglang_dialect_endpoints(tmp_path: Path) -> None:
    port = free_port()
    args = ["sim", "--dialect", "sglang", "--model", "org/name", "--port", str(port), "--instant"]
    with spawn(args, port=port, log_dir=tmp_path) as proc:
        for path in ("/health", "/health_generate", "/v1/models"):
            assert http_get(proc.url + path)[0] == 200, path
        for path in ("/get_server_info", "/server_info", "/get_model_info", "/model_info"):
            status, body = http_get(proc.url + path)
            assert status == 200, path
            model_path = json.loads(body)["model_path"]
            assert model_path != "org/name" and model_path.startswith("/"), "a local path, not a hub id"
        load = json.loads(http_get(proc.url + "/get_load")[1])
        assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
        status, _, body = post(proc.url + "/v1/chat/completions", {"model": "other", "messages": []})
        assert status == 404 and json.loads(body)["object"] == "error"
        text = http_get(proc.url + "/metrics")[1].decode()
        assert metric(text, "sglang:num_running_reqs", model_name="org/name") == 0.0


def test_llamacpp_dialect_endpoints(tmp_path: Path) -> None:
    port = free_port()
    args = ["sim", "--dialect", "llamacpp", "--port", str(port), "--instant", "--max-num-seqs", "4"]
    with spawn(args, port=port, log_dir=tmp_path) as proc:
        status, body = http_get(proc.url + "/health")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        slots = json.loads(http_get(proc.url + "/slots")[1])
        assert [s["id"] for s in slots] == [0, 1, 2, 3]
        assert all(s["is_processing"] is False for s in slots)
        status, _, body = post(
            proc.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 200
        text = http_get(proc.url + "/metrics")[1].decode()
        assert metric(text, "llamacpp:tokens_predicted_total") == 16.0
        assert metric(text, "llamacpp:requests_processing") == 0.0


def test_requests_beyond_max_num_seqs_queue_and_disconnect_aborts(tmp_path: Path) -> None:
    """Timed sim: 2 slots, 20 ms steps. Four streams: two run, two wait; dropping one frees its slot."""
    port = free_port()
    args = ["sim", "--port", str(port), "--max-num-seqs", "2", "--decode-ms-per-token", "20"]
    with spawn(args, port=port, log_dir=tmp_path) as proc:
        conns = []
        for i in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = {
                "messages": [{"role": "user", "content": f"long story {i}"}],
                "max_tokens": 2000,
                "stream": True,
            }
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
            conns.append(conn)
        first = conns[0].getresponse()
        assert first.status == 200
        first.fp.readline()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = json.loads(http_get(proc.url + "/sim/stats")[1])
            if stats["running"] == 2 and stats["waiting"] == 2:
                break
            time.sleep(0.05)
        text = http_get(proc.url + "/metrics")[1].decode()
        assert metric(text, "vllm:num_requests_running") == 2.0
        assert metric(text, "vllm:num_requests_waiting") == 2.0
        assert metric(text, "vllm:kv_cache_usage_perc") > 0.0
        for conn in conns:
            if conn.sock is not None:
                conn.sock.shutdown(2)
            conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = json.loads(http_get(proc.url + "/sim/stats")[1])
            if stats["aborted_total"] == 4:
                break
            time.sleep(0.02)
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
        text = http_get(proc.url + "/metrics")[1].decode()
        assert metric(text, "vllm:request_success_total", finished_reason="abort") == 4.0
        assert metric(text, "vllm:kv_cache_usage_perc") == 0.0
        assert metric(text, "vllm:num_requests_running") == 0.0

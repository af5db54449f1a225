"""GET /metrics: names follow Prometheus conventions and values move with known requests."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import LONG_TOKENS, TEST_N_CTX, RunningServer
from helpers import data_url, image_message, photo_bytes
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, frozenset[tuple[str, str]]]


def scrape(server: RunningServer) -> dict[Key, float]:
    resp = httpx.get(f"{server.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def chat(server: RunningServer, body: dict) -> httpx.Response:
    return httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)


def test_names_follow_prometheus_conventions(server: RunningServer) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    ours = {f.name: f for f in families if f.name.startswith("vlserve_")}
    assert all(f.name.startswith(("vlserve_", "process_")) for f in families)
    for family in ours.values():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    expected = {
        "vlserve_stage_seconds", "vlserve_time_to_first_token_seconds",
        "vlserve_request_duration_seconds", "vlserve_requests", "vlserve_prompt_tokens",
        "vlserve_image_tokens", "vlserve_cached_tokens", "vlserve_completion_tokens",
        "vlserve_image_cache_hits", "vlserve_image_cache_misses", "vlserve_uploads",
        "vlserve_slots", "vlserve_busy_slots", "vlserve_queue_depth", "vlserve_kv_cells",
        "vlserve_kv_cells_used", "vlserve_model_loaded", "vlserve_model_warm",
        "vlserve_warmup_seconds", "vlserve_build_info", "vlserve_store_entries",
        "vlserve_store_bytes", "vlserve_background_responses_running",
    }
    assert expected <= set(ours), expected - set(ours)


def test_gpu_gauges_only_with_a_gpu(server: RunningServer) -> None:
    from server.gpu_metrics import nvml_collector

    has_gpu = nvml_collector() is not None
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert ("vlserve_gpu_memory_used_bytes" in text) == has_gpu


def test_values_move_after_known_requests(server: RunningServer) -> None:
    before = scrape(server)
    text = chat(server, {"messages": [{"role": "user", "content": "metrics, text"}],
                         "max_tokens": 3})
    image = chat(server, {"messages": [image_message("metrics, image",
                                                     data_url(photo_bytes(seed=42)))],
                          "max_tokens": 3})
    bad = chat(server, {"messages": []})
    assert (text.status_code, image.status_code, bad.status_code) == (200, 200, 400)
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    replies = [text.json(), image.json()]
    for finish in {r["choices"][0]["finish_reason"] for r in replies}:
        expected = sum(r["choices"][0]["finish_reason"] == finish for r in replies)
        assert delta("vlserve_requests_total", status="200", finish_reason=finish) == expected
    assert delta("vlserve_requests_total", status="400", finish_reason="none") == 1

    usage = [r["usage"] for r in replies]
    assert delta("vlserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vlserve_completion_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("vlserve_cached_tokens_total") == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert delta("vlserve_image_tokens_total") == 64
    assert delta("vlserve_image_cache_misses_total") == 1
    assert delta("vlserve_image_cache_hits_total") == 0

    # One observation per stage and request; image stages only for the image request.
    image_timings = replies[1]["timings"]
    for stage in ("queue", "prompt_eval", "generation"):
        assert delta("vlserve_stage_seconds_count", stage=stage, has_images="false") == 1
        assert delta("vlserve_stage_seconds_count", stage=stage, has_images="true") == 1
    for stage in ("image_decode", "image_resize", "image_encode"):
        assert delta("vlserve_stage_seconds_count", stage=stage, has_images="false") == 0
        assert delta("vlserve_stage_seconds_count", stage=stage, has_images="true") == 1
        # The same number the response reported (which is rounded to µs), in seconds.
        assert delta("vlserve_stage_seconds_sum", stage=stage, has_images="true") == \
            pytest.approx(image_timings[stage] / 1000, abs=1e-5)
    for images in ("true", "false"):
        assert delta("vlserve_time_to_first_token_seconds_count", has_images=images) == 1
        assert delta("vlserve_request_duration_seconds_count", has_images=images) == 1
    assert delta("vlserve_request_duration_seconds_sum", has_images="true") == \
        pytest.approx(image_timings["total"] / 1000, abs=1e-5)


def test_engine_gauges(server: RunningServer) -> None:
    chat(server, {"messages": [{"role": "user", "content": "fill some KV"}], "max_tokens": 2})
    samples = scrape(server)
    assert value(samples, "vlserve_slots") == 2
    assert value(samples, "vlserve_busy_slots") == 0
    assert value(samples, "vlserve_queue_depth") == 0
    assert value(samples, "vlserve_kv_cells") == TEST_N_CTX
    # Idle slots keep their KV for prefix reuse, so cells stay in use after the request.
    assert 0 < value(samples, "vlserve_kv_cells_used") <= TEST_N_CTX
    assert value(samples, "vlserve_model_loaded") == 1
    assert value(samples, "vlserve_model_warm") == 1
    assert value(samples, "vlserve_warmup_seconds") > 0
    build = [k for k in samples if k[0] == "vlserve_build_info"]
    assert dict(build[0][1])["model"] == "vlserve-demo-llava"


def test_streamed_requests_are_counted_when_they_end(server: RunningServer) -> None:
    before = scrape(server)
    body = {"messages": [{"role": "user", "content": "stream me"}], "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", f"{server.api}/chat/completions", json=body, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    after = scrape(server)
    counted = sum(value(after, "vlserve_requests_total", status="200", finish_reason=f)
                  - value(before, "vlserve_requests_total", status="200", finish_reason=f)
                  for f in ("stop", "length"))
    assert counted == 1


def test_store_gauges_follow_what_is_kept(long_server: RunningServer) -> None:
    """vlserve_store_{entries,bytes}{store}: up when a response, a conversation or a file is
    kept, back down when each is deleted (read from the tables at scrape time). On this
    module's own server: the session's may have its stores at their bounds by now."""
    server = long_server
    before = scrape(server)
    stored = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": "Keep me.", "max_output_tokens": 2}).json()
    conversation = httpx.post(f"{server.api}/conversations", json={"metadata": {"k": "v"}},
                              timeout=30).json()
    upload = httpx.post(f"{server.api}/files", data={"purpose": "vision"}, timeout=30,
                        files={"file": ("g.png", photo_bytes(64, 48))}).json()
    during = scrape(server)

    def delta(name: str, store: str) -> float:
        return value(during, name, store=store) - value(before, name, store=store)

    assert stored["store"] is True
    for store in ("responses", "conversations", "files"):
        assert delta("vlserve_store_entries", store) == 1, store
    assert delta("vlserve_store_bytes", "responses") > len("Keep me.")
    assert delta("vlserve_store_bytes", "conversations") == len('{"k":"v"}')  # its JSON
    assert delta("vlserve_store_bytes", "files") == 64 * 48 * 3  # kept decoded

    for path in (f"responses/{stored['id']}", f"conversations/{conversation['id']}",
                 f"files/{upload['id']}"):
        assert httpx.delete(f"{server.api}/{path}", timeout=30).status_code == 200, path
    after = scrape(server)
    for store in ("responses", "conversations", "files"):
        for name in ("vlserve_store_entries", "vlserve_store_bytes"):
            assert value(after, name, store=store) == value(before, name, store=store)


def test_background_responses_running_gauge(long_server: RunningServer) -> None:
    server = long_server
    gauge = "vlserve_background_responses_running"
    assert value(scrape(server), gauge) == 0
    running = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": "Go on.", "max_output_tokens": LONG_TOKENS, "temperature": 0,
        "background": True}).json()
    assert value(scrape(server), gauge) == 1  # started before the answer went out
    cancelled = httpx.post(f"{server.api}/responses/{running['id']}/cancel", timeout=60)
    assert cancelled.json()["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while value(scrape(server), gauge) != 0:  # its end is recorded just after the cancel
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_refused_method_is_counted_and_a_listing_is_not(long_server: RunningServer) -> None:
    """GET /chat/completions lists stored completions (no generation: not a chat request);
    any other method there but POST is a chat request refused, counted as its 405."""
    server = long_server
    before = scrape(server)
    assert httpx.put(f"{server.api}/chat/completions", json={}, timeout=30).status_code == 405
    assert httpx.get(f"{server.api}/chat/completions", timeout=30).status_code == 200
    after = scrape(server)
    counted = {status: value(after, "vlserve_requests_total", status=status,
                             finish_reason="none")
               - value(before, "vlserve_requests_total", status=status, finish_reason="none")
               for status in ("405", "200")}
    assert counted == {"405": 1, "200": 0}


def test_the_apis_other_calls_are_counted_by_route_and_mutations_logged(
        long_server: RunningServer) -> None:
    """Files, batches, stored responses...: counted and timed by route template (bounded
    labels, never the id in the path); a change or a failure also gets a log line."""
    server = long_server
    before = scrape(server)
    upload = httpx.post(f"{server.api}/files", timeout=30, data={"purpose": "vision"},
                        files={"file": ("a.png", photo_bytes(64, 48))})
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    for _ in range(3):
        assert httpx.get(f"{server.api}/files/{file_id}", timeout=30).status_code == 200
    assert httpx.get(f"{server.api}/files/file-nope", timeout=30).status_code == 404
    assert httpx.get(f"{server.api}/no/such/route", timeout=30).status_code == 404
    assert httpx.delete(f"{server.api}/files/{file_id}", timeout=30).status_code == 200
    # Answered before routing (JSON nested too deep): still named by the route it aimed at.
    deep = httpx.post(f"{server.api}/batches", content=b"[" * 300 + b"]" * 300, timeout=30,
                      headers={"content-type": "application/json"})
    assert deep.status_code == 400, deep.text
    unknown = {httpx.request(method, f"{server.api}/files", timeout=30).status_code
               for method in ("PROPFIND", "MKCOL")}  # methods no route has: one label
    (unknown_status,) = unknown
    # A generation path's other methods are chat requests (RequestObserver's), not these.
    assert httpx.options(f"{server.api}/chat/completions", timeout=30).status_code == 405
    after = scrape(server)

    def counted(route: str, method: str, status: str) -> float:
        labels = {"route": route, "method": method, "status": status}
        return value(after, "vlserve_api_calls_total", **labels) - value(
            before, "vlserve_api_calls_total", **labels)

    assert counted("/files", "POST", "200") == 1
    assert counted("/files/{file_id}", "GET", "200") == 3
    assert counted("/files/{file_id}", "GET", "404") == 1
    assert counted("/files/{file_id}", "DELETE", "200") == 1
    assert counted("unmatched", "GET", "404") == 1
    assert counted("/batches", "POST", "400") == 1
    assert counted("/files", "other", str(unknown_status)) == 2
    assert not any(dict(labels).get("method") in ("PROPFIND", "MKCOL") for _, labels in after)
    assert not any(name == "vlserve_api_calls_total" and file_id in str(labels)
                   for name, labels in after)
    # Chat requests are not counted twice: they have their own metric.
    assert all(dict(labels).get("route") != "/chat/completions" or
               dict(labels).get("method") == "GET"
               for name, labels in after if name == "vlserve_api_calls_total")
    logged = [line for line in server.log().splitlines() if '"event": "api_call"' in line]
    assert any('"method": "DELETE"' in line and "\"/files/{file_id}\"" in line
               for line in logged)
    assert any('"status": 404' in line and '"route": "unmatched"' in line for line in logged)
    assert not any('"method": "GET"' in line and '"status": 200' in line for line in logged)

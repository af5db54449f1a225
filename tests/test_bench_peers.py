"""bench.peers' bookkeeping: servers take turns per metric with a rotating first, ratios
are paired per repetition, and a baseline commit runs from its own checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import peers
from bench.servers import Server


def fake_server(name: str) -> Server:
    return Server(name, f"http://127.0.0.1:1/{name}", None, Path("/dev/null"))  # type: ignore[arg-type]


def test_servers_take_turns_per_metric_and_the_first_rotates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, int]] = []

    def metric(name: str) -> object:
        def measure(_client: object, server: Server, rep: int) -> float:
            calls.append((name, server.name, rep))
            return {"a": 1.0, "b": 2.0, "c": 4.0}[server.name] * (rep + 2)
        return measure

    monkeypatch.setattr(peers, "wait_quiet", lambda servers: None)
    monkeypatch.setitem(peers.METRICS, "m1", metric("m1"))
    monkeypatch.setitem(peers.METRICS, "m2", metric("m2"))
    servers = [fake_server("a"), fake_server("b"), fake_server("c")]
    samples = peers.measure_rotating(("m1", "m2"), servers, reps=2)
    timed = [c for c in calls if c[2] >= 0]
    assert [(m, s) for m, s, _ in timed] == [
        ("m1", "a"), ("m1", "b"), ("m1", "c"), ("m2", "b"), ("m2", "c"), ("m2", "a"),
        ("m1", "b"), ("m1", "c"), ("m1", "a"), ("m2", "c"), ("m2", "a"), ("m2", "b")]
    assert samples["b"]["m1"] == [4.0, 6.0]


def test_ratios_pair_each_repetition_with_llama_servers_value() -> None:
    row = peers.Row("case", "decode_tps", {"vlserve": [90.0, 120.0, 100.0],
                                           peers.THEIRS: [100.0, 100.0, 125.0]})
    assert row.ratios("vlserve") == [0.9, 1.2, 0.8]
    # The median of the ratios (0.9), not the ratio of the medians (100 / 100).
    assert row.median("vlserve") / row.median(peers.THEIRS) == 1.0


def test_table_shows_the_paired_ratio_its_range_and_the_baseline(
        capsys: pytest.CaptureFixture[str]) -> None:
    row = peers.Row("bench demo", "decode_tps", {"vlserve": [90.0, 120.0, 100.0],
                                                 "vlserve@HEAD~1": [80.0, 80.0, 80.0],
                                                 peers.THEIRS: [100.0, 100.0, 125.0]})
    peers.print_table([row], "vlserve@HEAD~1")
    line = capsys.readouterr().out.splitlines()[-1]
    assert "bench demo: single-stream decode, tok/s" in line
    assert " 0.90 " in line and "0.80-1.20" in line and " 0.80 " in line
    assert line.endswith("≥ 1 (NOT met)")


def test_a_baseline_runs_from_its_own_checkout_removed_afterwards() -> None:
    head = subprocess.run(["git", "-C", str(peers.ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with peers.worktree("HEAD") as folder:
        assert (folder / "server" / "cli.py").is_file()
        checked_out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                                     check=True, capture_output=True, text=True).stdout.strip()
        assert checked_out == head
    assert not folder.parent.exists()
    listed = subprocess.run(["git", "-C", str(peers.ROOT), "worktree", "list"], check=True,
                            capture_output=True, text=True).stdout
    assert str(folder) not in listed


def test_a_baseline_that_is_no_commit_says_so() -> None:
    with pytest.raises(SystemExit, match="--baseline-ref no-such-ref"), \
            peers.worktree("no-such-ref"):
        pass


def test_llama_server_keeps_a_full_sliding_window_cache_as_vlserve_does(tmp_path: Path) -> None:
    case = peers.Case("gemma", tmp_path / "m.gguf", None, None, ("decode_tps",))
    template = tmp_path / "t.jinja"
    args = peers.llama_server_args(tmp_path, case, 9999, 2, template)
    assert "--swa-full" in args
    assert args[args.index("--chat-template-file") + 1] == str(template)
    assert args[args.index("-t") + 1] == args[args.index("-tb") + 1] == "2"
    assert "--mmproj" not in args
    assert "--spec-type" not in args  # no drafts unless both draft


def test_with_ngram_both_servers_draft_from_the_context(tmp_path: Path) -> None:
    case = peers.Case("gemma", tmp_path / "m.gguf", None, None, ("decode_tps",))
    args = peers.llama_server_args(tmp_path, case, 9999, 2, None, ngram=True)
    assert args[args.index("--spec-type") + 1] == "ngram-simple"


def test_floor_tests_do_each_metrics_work_as_vlserve_reports_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding's test is the answer's length after the story prompt; the aggregate's is
    four such answers decoded at once; a turn 2's is the prompt tokens vlserve
    evaluated when it came, after those it had cached (its guess)."""
    asked: list[tuple[str, int]] = []

    def complete(_client: object, server: Server, messages: list[dict], max_tokens: int
                 ) -> tuple[float, dict]:
        asked.append((server.name, max_tokens))
        turn2 = len(messages) > 1
        usage = {"prompt_tokens": 60 if turn2 else 31,
                 "prompt_tokens_details": {"cached_tokens": 50 if turn2 else 0}}
        return 0.01, {"usage": usage, "choices": [{"message": {"content": "An answer."}}]}

    monkeypatch.setattr(peers, "complete", complete)
    monkeypatch.setattr(peers, "wait_quiet", lambda servers: None)
    monkeypatch.setattr(peers.time, "sleep", lambda seconds: None)
    servers = [fake_server("vlserve"), fake_server(peers.THEIRS)]
    tests = peers.floor_tests(("decode_tps", "ms_per_token", "aggregate_tps_4",
                               "text_turn2_ttft_s"), servers)
    assert tests == {"decode_tps": peers.FloorTest(0, peers.FLOOR_TG, 31),
                     "ms_per_token": peers.FloorTest(0, 256, 31),
                     "aggregate_tps_4": peers.FloorTest(0, 128, 31, streams=4),
                     "text_turn2_ttft_s": peers.FloorTest(10, 0, 50)}
    assert {name for name, _ in asked} == {"vlserve"}  # llama-server is not asked


def test_floors_come_from_one_llama_bench_run_per_test_and_repetition(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runs: list[tuple[str, peers.FloorTest]] = []
    decode, turn2 = peers.FloorTest(0, 256, 31), peers.FloorTest(15, 0, 45)
    four = peers.FloorTest(0, 128, 31, streams=4)

    def llama_bench(_bin: Path, _model: Path, _threads: int, test: peers.FloorTest) -> dict:
        runs.append(("llama-bench", test))
        return {"avg_ts": 80.0, "avg_ns": 1_000_000_000 * 80 // 256} if test.generated \
            else {"avg_ts": 400.0, "avg_ns": 35_000_000}

    def llama_batched_bench(_bin: Path, _model: Path, _threads: int, test: peers.FloorTest
                            ) -> dict:
        runs.append(("batched", test))
        return {"t_pp": 0.5, "t_tg": 4.62, "t": 5.12, "speed_tg": 110.8}

    monkeypatch.setattr(peers, "llama_bench", llama_bench)
    monkeypatch.setattr(peers, "llama_batched_bench", llama_batched_bench)
    probe = peers.FloorProbe(tmp_path, tmp_path / "m.gguf", 2, {
        "decode_tps": decode, "decode_ms_server": decode, "text_turn2_at_once_ttft_s": turn2,
        "aggregate_tps_4": four})
    assert probe.value("decode_tps", 0) == 80.0
    assert probe.value("decode_ms_server", 0) == 12.5  # the same run, as ms a token
    assert probe.value("text_turn2_at_once_ttft_s", 0) == 0.035
    # The clients' 512 tokens over the time they took to decode (the prompts' left out).
    assert probe.value("aggregate_tps_4", 0) == pytest.approx(110.8, abs=0.1)
    assert probe.value("decode_tps_stream", 0) is None  # a metric without a test
    assert runs == [("llama-bench", decode), ("llama-bench", turn2), ("batched", four)]
    probe.value("decode_tps", 1)  # the next repetition runs it again
    assert runs[-1] == ("llama-bench", decode) and len(runs) == 4
    assert probe.source("decode_tps") == "tg256 at depth 31"
    assert probe.source("text_turn2_at_once_ttft_s") == "pp15 at depth 45"
    assert probe.source("aggregate_tps_4") == "4 x tg128 at depth 31"


def test_the_floor_is_measured_in_each_repetition_right_after_the_servers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []

    def measure(_client: object, server: Server, rep: int) -> float:
        calls.append((server.name, rep))
        return 1.0

    class Probe(peers.FloorProbe):
        def value(self, metric: str, rep: int) -> float | None:
            calls.append((peers.FLOOR, rep))
            return 0.5

    monkeypatch.setattr(peers, "wait_quiet", lambda servers: None)
    monkeypatch.setitem(peers.METRICS, "m1", measure)
    samples = peers.measure_rotating(("m1",), [fake_server("a"), fake_server("b")], reps=2,
                                     floors=Probe(tmp_path, tmp_path, 2, {}))
    assert [c for c in calls if c[1] >= 0] == [("a", 0), ("b", 0), (peers.FLOOR, 0),
                                               ("b", 1), ("a", 1), (peers.FLOOR, 1)]
    assert samples[peers.FLOOR]["m1"] == [0.5, 0.5]


def test_llama_bench_runs_as_the_servers_do(tmp_path: Path) -> None:
    args = peers.llama_bench_args(tmp_path, tmp_path / "m.gguf", 2, peers.FloorTest(15, 0, 45))
    assert args[0] == str(tmp_path / "llama-bench")
    assert args[args.index("-t") + 1] == "2"
    assert args[args.index("-fa") + 1] == "1"  # what "auto" picks on a CPU, in both servers
    assert args[args.index("-o") + 1] == "json"
    assert [args[args.index(flag) + 1] for flag in ("-p", "-n", "-d")] == ["15", "0", "45"]
    batched = peers.llama_batched_bench_args(tmp_path, tmp_path / "m.gguf", 2,
                                             peers.FloorTest(0, 128, 31, streams=4))
    assert batched[0] == str(tmp_path / "llama-batched-bench")
    assert [batched[batched.index(flag) + 1] for flag in ("-t", "-tb", "-fa", "-c")] \
        == ["2", "2", "on", str(peers.N_CTX)]
    assert "--kv-unified" in batched and "--swa-full" in batched  # as llama-server runs
    assert [batched[batched.index(flag) + 1] for flag in ("-npp", "-ntg", "-npl")] \
        == ["31", "128", "4"]


def test_the_floor_table_says_whether_each_goal_lies_within_the_floor(
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        peers.Row("gemma", "decode_tps", {"vlserve": [70.0, 70.0], peers.THEIRS: [73.0, 80.0],
                                          peers.FLOOR: [80.3, 80.0]}, "tg256 at depth 31"),
        peers.Row("gemma", "text_turn2_at_once_ttft_s",
                  {"vlserve": [0.045], peers.THEIRS: [0.06], peers.FLOOR: [0.035]}, "pp15"),
        peers.Row("gemma", "decode_tps_stream", {"vlserve": [110.0], peers.THEIRS: [100.0]}),
    ]
    peers.print_floors(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # the header; the streamed rate had no floor measured
    # Ratios paired per repetition (1.10 and 1.00): their median and range.
    assert "tg256 at depth 31" in lines[1] and " 1.05 " in lines[1] and "1.00-1.10" in lines[1]
    assert lines[1].endswith("≥ 1 (within the floor)")
    # 35 ms of evaluation alone is 0.58 of llama-server's 60 ms: 0.5 is out of reach.
    assert " 0.58 " in lines[2] and lines[2].endswith("≤ 0.5 (past the floor)")


def test_llama_batched_bench_is_built_beside_llama_server_when_missing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built: list[list[str]] = []
    monkeypatch.setattr(peers.subprocess, "run", lambda args, **_: built.append(args))
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no llama\.cpp build folder"):
        peers.build_batched_bench(bin_dir)
    (tmp_path / "build" / "CMakeCache.txt").write_text("")
    peers.build_batched_bench(bin_dir)
    assert built and built[0][:5] == ["cmake", "--build", str(tmp_path / "build"), "--target",
                                      "llama-batched-bench"]
    (bin_dir / "llama-batched-bench").write_text("")
    peers.build_batched_bench(bin_dir)
    assert len(built) == 1  # there already: not built again

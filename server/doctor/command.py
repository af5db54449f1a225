"""`vlserve doctor [--config C | --model M --mmproj P] [--json]`: exit 0 when all is well."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.config import Settings, load_settings
from server.doctor.report import Check, Report

EXIT_PROBLEMS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML preset (default configs/default.yaml)")
    parser.add_argument("--model", type=Path, help="text model GGUF")
    parser.add_argument("--mmproj", type=Path, help="vision projector (mmproj) GGUF")
    parser.add_argument("--n-gpu-layers", type=int, help="-1 offloads every layer")
    parser.add_argument("--registry", type=Path, help="registry YAML for the sha256 check "
                        "(default $VLSERVE_REGISTRY or models/registry.yaml)")
    parser.add_argument("--no-engine", action="store_true",
                        help="static checks only: do not load the model or run requests")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the model may take to load and warm up (default 600)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the server's and llama.cpp's log lines on stderr")


def run(args: argparse.Namespace) -> int:
    from server.logs import setup_logging
    from server.registry import registry_path

    settings = load_settings(args.config, model=args.model, mmproj=args.mmproj,
                             n_gpu_layers=args.n_gpu_layers)
    # The report says what matters; the engine's own lines only on request.
    setup_logging("info" if args.verbose else "error")
    report = diagnose(settings, registry_path(args.registry), engine=not args.no_engine,
                      timeout_s=args.timeout)
    if args.json:
        report.write_json(sys.stdout)
    else:
        report.write_text(sys.stdout)
    for problem in report.problems:
        print(f"vlserve doctor: {problem}", file=sys.stderr)
    return 0 if report.ok else EXIT_PROBLEMS


def diagnose(settings: Settings, registry: Path, *, engine: bool = True,
             timeout_s: float = 600.0) -> Report:
    """Every check in order; a check whose input is missing is skipped and says why."""
    from server.cpus import usable_cores
    from server.doctor.checks import (
        check_build,
        check_files,
        check_gguf,
        check_gpus,
        check_sha256,
        check_template,
        check_threads,
    )
    from server.engine.build_info import read_build_info
    from server.engine.supported import read_gguf_kinds

    report = Report()
    build = read_build_info()
    report.add(check_build(build))
    report.add(check_gpus(build))
    report.add(check_threads(settings, usable_cores()))
    if report.add(check_files(settings, registry)).failed:
        return _skip(report, "sha256", "gguf", "template", "engine", why="model files missing")
    report.add(check_sha256(settings, registry))
    try:
        kinds = read_gguf_kinds(Path(settings.model),
                                Path(settings.mmproj) if settings.mmproj else None)
    except (ValueError, OSError) as exc:  # GGUFMetaError (a ValueError): not a GGUF file
        report.add(Check("gguf", "fail", f"cannot read the GGUF headers: {exc}"))
        return _skip(report, "template", "engine", why="GGUF headers unreadable")
    gguf = report.add(check_gguf(kinds, settings))
    report.add(check_template(kinds, settings))
    if not engine:
        return _skip(report, "engine", why="--no-engine")
    if gguf.failed:
        return _skip(report, "engine", why="this build cannot load the model")
    from server.doctor.probe import check_engine

    report.add(check_engine(settings, timeout_s))
    return report


def _skip(report: Report, *names: str, why: str) -> Report:
    for name in names:
        report.add(Check(name, "skip", why))
    return report


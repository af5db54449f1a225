"""The cluster's one address: nginx in front of the router and the replicas.

vllm-router forwards JSON only (a multipart `POST /files` gets "Invalid JSON body"), so
nginx (Debian's package, a maintained proxy) sends the Files API (`/v1/files`,
`/api/v1/files` and their `/{id}` paths) straight to any replica, round robin, and
everything else to the router, which keeps sessions on their replica. Any replica can
answer a Files call because the files live in the shared store (`state_url: redis://`);
with `memory://` a file would exist on one replica only, so the front needs shared state.

`vlserve cluster --redis` (or `--state-url`) runs it on the cluster's port, with the router
behind it on loopback; `vlserve cluster-front` writes the file for operators who run nginx
themselves (`nginx -c FILE -p DIR`), as the supervisord group does with
supervisor/vlserve-front.nginx.conf.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

# Each path with both the /v1 (SDK default) and /api/v1 prefixes the server answers on.
FILES_PATHS = r"^/(api/)?v1/files(/|$)"
CHAT_COMPLETIONS_PATH = r"^/(api/)?v1/chat/completions$"
# vllm-router's administration (its worker list, cache, profiler): never for clients. Through
# the front anyone could otherwise take every replica out of the router's list.
ROUTER_ADMIN_PATHS = (r"^/(add_worker|remove_worker|workers|list_workers|flush_cache|"
                      r"start_profile|stop_profile)(/|$)")
_NOT_FOUND = ('{"error": {"message": "not found", "type": "invalid_request_error", '
              '"param": null, "code": "not_found"}}')
# nginx's own failures (no replica or router answered) in OpenAI's error shape.
_UNREACHABLE = ('{"error": {"message": "no vlserve replica or router answered; try again '
                'shortly", "type": "server_error", "param": null, "code": "upstream_unavailable"}}')


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"expected http://host:port, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


def nginx_conf(listen: str, router_url: str, replica_urls: Sequence[str], workdir: Path) -> str:
    """The configuration text: `listen` is host:port; runtime files go under `workdir`."""
    if not replica_urls:
        raise ValueError("the front needs at least one replica for uploads")
    replicas = "\n".join(f"        server {_hostport(u)} max_fails=1 fail_timeout=5s;"
                         for u in replica_urls)
    return f"""# Written by vlserve (server/cluster/front.py): uploads to any replica, the rest to
# the router. Regenerate rather than edit: `vlserve cluster` rewrites it at every start,
# `vlserve cluster-front` writes it for your own nginx.
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    # vlserve answers oversize bodies itself, with an OpenAI-style 413.
    client_max_body_size 0;
    # Streamed both ways: uploads reach the replica as they arrive (no temp file), SSE
    # tokens reach the client as they are generated.
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;

    upstream vlserve_replicas {{
{replicas}
    }}
    upstream vlserve_router {{
        server {_hostport(router_url)};
    }}
    # vllm-router takes POST /v1/chat/completions only (a GET there is its 405): listing
    # stored chat completions goes to the replicas, which share them.
    map $request_method $chat_completions_upstream {{
        GET vlserve_replicas;
        HEAD vlserve_replicas;
        default vlserve_router;
    }}

    server {{
        listen {listen};
        error_page 502 504 = @unreachable;
        location @unreachable {{
            default_type application/json;
            return 502 '{_UNREACHABLE}';
        }}
        location ~ {FILES_PATHS} {{
            # A replica that refuses the connection is skipped; a POST already sent is
            # not replayed (nginx's default for non-idempotent requests).
            proxy_next_upstream error timeout;
            proxy_pass http://vlserve_replicas;
        }}
        location ~ {CHAT_COMPLETIONS_PATH} {{
            proxy_pass http://$chat_completions_upstream;
        }}
        location ~ {ROUTER_ADMIN_PATHS} {{
            default_type application/json;
            return 404 '{_NOT_FOUND}';
        }}
        location / {{
            proxy_pass http://vlserve_router;
        }}
    }}
}}
"""


def write_nginx_conf(listen: str, router_url: str, replica_urls: Sequence[str],
                     path: Path, workdir: Path | None = None) -> Path:
    """Write the front's nginx.conf to `path`; nginx's runtime files go under `workdir`
    (default: the file's folder)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime = Path(workdir).absolute() if workdir is not None else path.parent
    path.write_text(nginx_conf(listen, router_url, replica_urls, runtime))
    return path


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def nginx_argv(conf: Path) -> list[str]:
    """The command that runs nginx on `conf` in the foreground, once `nginx -t` accepts it.
    SIGTERM stops it at once; SIGQUIT lets in-flight requests finish first."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    conf = Path(conf).resolve()
    argv = [binary, "-c", str(conf), "-p", str(conf.parent), "-e", "stderr"]
    check = subprocess.run([*argv[:1], "-t", "-q", *argv[1:]], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused {conf}: {check.stderr.strip()}")
    return argv


def launch_nginx(conf: Path, *, stderr: int | None = None) -> subprocess.Popen[bytes]:
    """Check `conf`, then start nginx on it in the foreground."""
    return subprocess.Popen(nginx_argv(conf), stdout=subprocess.DEVNULL, stderr=stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", nargs="+", required=True, metavar="URL",
                        help="the replicas' URLs (http://host:port): uploads go to these")
    parser.add_argument("--router", required=True, metavar="URL",
                        help="vllm-router's URL: everything else goes there")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="where nginx listens (the cluster's one address)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="the nginx.conf to write")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="nginx's pid and temp files (default: FILE's folder); run "
                        "nginx with -p DIR")


def run(args: argparse.Namespace) -> int:
    """`vlserve cluster-front`: write the front's nginx.conf, then say how to run it."""
    try:
        path = write_nginx_conf(args.listen, args.router, args.replicas, args.output,
                                args.workdir)
    except ValueError as exc:
        print(f"vlserve cluster-front: {exc}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).absolute() if args.workdir else path.parent
    print(f"wrote {path}; run: nginx -c {path} -p {workdir} -e stderr", file=sys.stderr)
    return 0


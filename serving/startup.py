"""Start-up checks that turn the usual first-hour mistakes into one line saying what to do, instead of a
stack trace from deep inside gRPC or transformers: a port already taken, a model folder that does not exist
(a typo), the VLM's and the audio model's folders swapped. Used by the three services' `__main__` and by
the command line's preflight (i2s_cli/preflight.py)."""
from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path
from typing import Callable

VLM, AUDIO = "vlm", "audio"
# What a checkpoint folder of each kind holds: transformers writes config.json, a diffusers pipeline
# (AudioLDM2) model_index.json (its sub-models have their own config.json in sub-folders).
MARKER = {VLM: "config.json", AUDIO: "model_index.json"}
WHAT = {VLM: "a Qwen2.5-VL checkpoint (config.json)", AUDIO: "an AudioLDM2 pipeline (model_index.json)"}


class StartupError(Exception):
    """A setting that cannot work; the message is one line that says what to do."""


def looks_like_path(model: str) -> bool:
    """A folder rather than a hub id: exists, starts like a path, lies in a folder that exists here, or is
    no valid `owner/name` id."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return True
    if path.parent != Path(".") and path.parent.is_dir():  # models/vlmm when models/ is here: a folder typo
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def check_model_folder(model: str, kind: str, flag: str = "--model") -> bool:
    """For a local folder: raises StartupError unless it is a checkpoint of `kind` (VLM or AUDIO).
    Returns False for a hub id, which only the hub can check."""
    if not looks_like_path(model):
        return False
    path = Path(model).expanduser()
    if not path.is_dir():
        near = sorted(p.name for p in path.parent.glob("[!.]*") if p.is_dir()) if path.parent.is_dir() else []
        hint = f" (in {path.parent}/: {', '.join(near[:6])})" if near else ""
        raise StartupError(f"{flag} {model}: no such folder{hint}; give a checkpoint folder or a hub id like "
                           f"owner/name")
    other = AUDIO if kind == VLM else VLM
    if (path / MARKER[kind]).is_file() and not (kind == VLM and (path / MARKER[AUDIO]).is_file()):
        return True
    if (path / MARKER[other]).is_file():
        raise StartupError(f"{flag} {model} is {WHAT[other]}, not {WHAT[kind]}: are the VLM and audio model "
                           f"folders swapped?")
    raise StartupError(f"{flag} {model} holds no {MARKER[kind]}: not {WHAT[kind]}")


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Raises StartupError when `port` is taken. Port 0 (any free port) always works."""
    if port <= 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use (another service still running?): "
                                   f"stop it, or pass {flag} N (0: any free port)") from None
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None


def check_ports_free(server) -> None:
    """The gRPC, health-only and metrics ports of a service's ServerOptions."""
    check_port_free(server.host, server.port, "--port")
    check_port_free(server.host, server.health_port, "--health-port")
    check_port_free(server.host, server.metrics_port, "--metrics-port")


def prepare_process(name: str, server) -> None:
    """What every service process does before building anything: its ports checked (one line when one is
    taken), then its log format and tracing (before any server or channel exists). ``server``: its
    ServerOptions."""
    from serving import request_log, tracing

    check_ports_free(server)
    request_log.configure_logging(name, server.telemetry.log_format)
    tracing.setup(name, server.telemetry)


def run_program(program: str, main: Callable[[], None]) -> None:
    """Runs a service's main: a StartupError ends it with `<program>: error: <message>` and exit code 2,
    Ctrl-C before the signal handlers are in place with exit code 130, both without a traceback."""
    try:
        main()
    except StartupError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None

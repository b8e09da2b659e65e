"""The `voiced` command line: one entry point, one sub-command per task.

Exit status 0 on success; otherwise non-zero with one clear line on stderr.
``--json`` output is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from voiced import __version__
from voiced.config import Config, load_config, to_dict, to_toml
from voiced.errors import ConfigError, VoicedError
from voiced.logsetup import one_line, setup_logging
from voiced.protocol import STREAM_FORMATS

log = logging.getLogger("voiced")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voiced", description="Voice-cloning speech daemon.")
    parser.add_argument("--version", action="version", version=f"voiced {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", help="config file (default: $VOICED_CONFIG, then the usual places)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed", help="print the speaker embedding of audio files (no daemon needed)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--config", help="config file (for the cache folder and the encoder settings)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--raw", action="store_true", help="skip volume normalisation and silence trimming")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("voices", help="list voices and their state (via the daemon)")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--watch", action="store_true",
                   help="follow the preparation live (a bar and an ETA on a terminal, a line per change "
                        "otherwise) until every voice is ready or failed; exit status 1 if any failed")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between looks with --watch")
    p.set_defaults(func=cmd_voices)

    p = sub.add_parser("say", help="synthesize speech (via the daemon)")
    p.add_argument("text", metavar="TEXT", help="the text to speak ('-' reads standard input)")
    p.add_argument("--voice", required=True, help="voice name (file name without extension)")
    p.add_argument("-o", "--output", default=None, help="output file ('-' = standard output; default: TEXT-derived .wav)")
    p.add_argument("--format", default=None, help="wav, flac, ogg, opus, mp3, pcm_s16le, pcm_f32le (default: from -o, else wav)")
    p.add_argument("--stream", action="store_true", help="write audio as it is produced (pcm or ogg)")
    p.add_argument("--speed", type=float, default=None, help="speaking rate, 0.5..2.0")
    p.add_argument("--sample-rate", type=int, default=None, help="resample the output to this rate")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait this long for a voice still being prepared")
    _client_args(p)
    p.set_defaults(func=cmd_say)

    p = sub.add_parser("status", help="daemon health, queue, memory, device")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    p.add_argument("name", metavar="NAME", help="the key's name, e.g. server or the client's host/user")
    p.add_argument("--dir", default=".", help="folder to write the two files into (default: the current one)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("check-config", help="validate a config file and print the resolved values")
    p.add_argument("file", nargs="?", metavar="FILE", help="the config file (the same as --config)")
    p.add_argument("--config", help="config file (default: $VOICED_CONFIG, then the usual places)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VoicedError as exc:
        print(f"voiced: {one_line(str(exc))}", file=sys.stderr)  # its text may come from the daemon
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader quit early (| head, a player closed): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a second error at exit
        return 141


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging("debug" if args.verbose else config.log.level, config.log.format)
    from voiced.daemon import serve  # heavy imports (torch) only where needed

    return serve(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.file is not None:
        if args.config is not None and args.config != args.file:
            raise ConfigError(f"two config files given: {args.file} and --config {args.config}")
        args.config = args.file
    config = _config(args)
    # the plugins and the engine's options as well: what `serve` would otherwise only refuse after
    # loading the speaker encoder (the engine is built, no model is loaded)
    # through the plugin host, not the daemon: check-config need not import torch (seconds)
    from voiced.hooks import PluginHost

    PluginHost(config.plugins, source=config.source).create_engine(config.engine, config.cache.dir, None)
    if args.json:
        print(json.dumps({"source": str(config.source) if config.source else None, **to_dict(config)}, indent=2))
    else:
        print(f"# resolved from {config.source or 'built-in defaults'}")
        print(to_toml(config), end="")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    setup_logging("debug" if args.verbose else "warning", "text")
    config = _config(args)
    from tqdm import tqdm

    from voiced.embedding import iter_embeddings

    files = [Path(f) for f in args.files]
    results = iter_embeddings(files, config, use_cache=not args.no_cache,
                              preprocess=config.encoder.preprocess and not args.raw)
    failed = 0
    out: list[dict[str, Any]] = []
    # a bar on a terminal (stderr) for more than one file; nothing in pipes and logs
    with tqdm(total=len(files), unit="file", file=sys.stderr, leave=False,
              disable=len(files) < 2 or not sys.stderr.isatty()) as bar:
        for result in results:
            bar.update(1)
            if result.error:
                failed += 1
                bar.write(f"voiced: {result.file}: {result.error}", file=sys.stderr)
            if args.json:
                out.append(result.to_dict())
            elif result.embedding is not None:
                values = " ".join(f"{x:.6f}" for x in result.embedding)
                bar.write(f"{result.file}\t{values}", file=sys.stdout)
    if args.json:
        print(json.dumps({"embeddings": out}))
    return 1 if failed else 0





def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=None, help="daemon endpoint (default: the config's first endpoint)")
    p.add_argument("--config", help="config file (for the default endpoint)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    p.add_argument("--server-key", metavar="FILE", default=None,
                   help="the daemon's public CURVE key (.key) for a tcp endpoint with CURVE (default: $VOICED_SERVER_KEY)")
    p.add_argument("--key", metavar="FILE", default=None,
                   help="this client's secret CURVE key (.key_secret) (default: $VOICED_CLIENT_KEY)")


def _client(args: argparse.Namespace) -> Any:
    from voiced.client import Client

    endpoint = args.endpoint or load_config(args.config, check_dirs=False).server.endpoints[0]
    return Client(endpoint, timeout_s=args.timeout, curve_server_key=args.server_key, curve_key=args.key)


def cmd_keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    name = args.name
    if not name or "/" in name or name.startswith(".") or os.sep in name:
        raise VoicedError(f"keygen: {name!r} is not a plain file name")
    folder = Path(args.dir).expanduser()
    public_file = folder / f"{name}.key"
    secret_file = folder / f"{name}.key_secret"
    for existing in (public_file, secret_file):
        if existing.exists():
            raise VoicedError(f"keygen: {existing} exists; not overwriting it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            public, secret = zmq.auth.create_certificates(folder, name)
        finally:
            os.umask(old)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
    except OSError as exc:
        raise VoicedError(f"keygen: cannot write into {folder}: {exc.strerror or exc}") from None
    public, secret = Path(public).resolve(), Path(secret).resolve()
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it private)")
    print(
        "\nAs the daemon's key, in its config's [server] table:\n"
        f'  curve_secret_key = "{secret}"\n'
        '  curve_clients_dir = "/etc/voiced/clients"   # the allowed clients\' .key files\n'
        f"and give clients the public key: --server-key {public}\n"
        f"As a client's key, copy {public} into the daemon's curve_clients_dir, then:\n"
        f"  voiced status --endpoint tcp://HOST:5599 --server-key SERVER.key --key {secret}\n"
        "  (or set VOICED_SERVER_KEY and VOICED_CLIENT_KEY)"
    )
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch_voices(args)
    with _client(args) as client:
        voices = client.voices()
    if args.json:
        print(json.dumps({"voices": voices}))
        return 0
    if not voices:
        print("no voices (drop recordings into the voices folder)")
    names = [one_line(v["name"]) for v in voices]
    width = max((_columns(n) for n in names), default=0)
    for name, v in zip(names, voices):
        state = v["state"] + (f"/{v['stage']}" if v.get("stage") else "")
        duration = f"{v['duration_s']:.1f}s" if v.get("duration_s") is not None else "-"
        extra = one_line(v.get("error") or v.get("note") or "")
        if v.get("progress"):  # a later stage running in the background
            extra = f"{v['progress']['stage']} {v['progress']['done']:.0%}" + (f"; {extra}" if extra else "")
        print(f"{name}{' ' * (width - _columns(name))}  {state:<16} {duration:>7}  {extra}".rstrip())
    return 0


def _tally(voices: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Voices per state, and the ready ones per stage (where the engine has stages)."""
    states: dict[str, int] = {}
    stages: dict[str, int] = {}
    for v in voices:
        states[v["state"]] = states.get(v["state"], 0) + 1
        if v["state"] == "ready" and v.get("stage"):
            stages[v["stage"]] = stages.get(v["stage"], 0) + 1
    return states, stages


def _summary(states: dict[str, int], stages: dict[str, int]) -> str:
    """'3 ready (1 quick, 2 refined), 1 failed, 2 pending'."""
    parts = []
    for state in ("ready", "failed", "preparing", "pending", *sorted(set(states) - {"ready", "failed", "preparing", "pending"})):
        if states.get(state):
            part = f"{states[state]} {state}"
            if state == "ready" and stages:
                part += " (" + ", ".join(f"{n} {stage}" for stage, n in sorted(stages.items())) + ")"
            parts.append(part)
    return ", ".join(parts)


def _watch_voices(args: argparse.Namespace) -> int:
    """Follow a bulk drop: poll the daemon until no voice is pending or preparing."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    bar: Any = None
    last = ""
    try:
        with _client(args) as client:
            while True:
                # files still being written are voices to come: a watch started right after a copy
                # must not end while the copy is still arriving. Asked before the voices: a file
                # the daemon stops counting as settling is a voice by then.
                arriving = int(client.status().get("settling", 0) or 0)
                voices = client.voices()
                states, stages = _tally(voices)
                done = states.get("ready", 0) + states.get("failed", 0)
                summary = _summary(states, stages) + (f", {arriving} arriving" if arriving else "")
                if args.json:
                    line = json.dumps({"voices": len(voices), "states": states, "stages": stages, "arriving": arriving})
                else:
                    line = (f"{done}/{len(voices)} done: {summary}" if voices
                            else f"no voices yet, {arriving} arriving" if arriving else "no voices yet")
                if terminal and not args.json:
                    if bar is None:
                        bar = tqdm(total=len(voices), unit="voice", file=sys.stderr, dynamic_ncols=True)
                    bar.total = len(voices)  # files may still be arriving
                    bar.update(done - bar.n)
                    bar.set_postfix_str(summary, refresh=True)
                elif line != last:
                    print(line, flush=True)
                last = line
                if voices and done == len(voices) and not arriving:
                    break
                time.sleep(args.interval)
    finally:
        if bar is not None:
            bar.close()
    failed = states.get("failed", 0)
    if terminal and not args.json:
        print(f"{len(voices)} voices: {summary}", file=sys.stderr)
    if failed:
        names = ", ".join(one_line(v["name"]) for v in voices if v["state"] == "failed")
        print(f"voiced: {failed} voice{'s' if failed > 1 else ''} failed: {names[:300]} ('voiced voices' says why)",
              file=sys.stderr)
        return 1
    return 0


def _columns(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


_SUFFIX_FORMATS = {".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".oga": "ogg", ".opus": "opus", ".mp3": "mp3",
                   ".pcm": "pcm_s16le", ".raw": "pcm_s16le", ".f32": "pcm_f32le"}


def cmd_say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    output = args.output or "say.wav"
    fmt = args.format or _SUFFIX_FORMATS.get(Path(output).suffix.lower(), "wav")
    if args.stream and fmt not in STREAM_FORMATS:
        raise VoicedError(f"--stream needs --format {', '.join(STREAM_FORMATS[:-1])} or {STREAM_FORMATS[-1]}, not {fmt}")
    if output == "-":
        _say_into(args, text, fmt, sys.stdout.buffer)
        return 0
    if Path(output).is_dir():
        raise VoicedError(f"{output} is a folder: give a file name, e.g. -o {Path(output) / 'say.wav'}")
    tmp = Path(output).with_name(f".{Path(output).name}.part")  # a finished file or none, never half a file
    try:
        with open(tmp, "wb") as sink:
            header = _say_into(args, text, fmt, sink)
        tmp.replace(output)
    except OSError as exc:  # the file's: the client's own failures are VoicedErrors
        raise VoicedError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    stage = header.get("voice", {}).get("stage")
    print(
        f"{output}: {header.get('duration_s', 0):.2f}s of {fmt} at {header.get('sample_rate')} Hz, "
        f"voice {one_line(args.voice)}{f' ({stage})' if stage else ''}",
        file=sys.stderr,
    )
    return 0


def _say_into(args: argparse.Namespace, text: str, fmt: str, sink: Any) -> dict[str, Any]:
    """Send the request, write the audio to ``sink`` as it comes; the (last) reply header."""
    params = {"speed": args.speed} if args.speed is not None else None
    with _client(args) as client:
        if not args.stream:
            reply = client.synthesize(text, args.voice, format=fmt, params=params,
                                      sample_rate=args.sample_rate, wait_s=args.wait)
            sink.write(reply.audio)
            return reply.header
        header: dict[str, Any] = {}
        for chunk in client.stream(text, args.voice, format=fmt, params=params,
                                   sample_rate=args.sample_rate, wait_s=args.wait):
            sink.write(chunk.audio)
            sink.flush()
            header = chunk.header
        return header


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    status.pop("id", None)
    status.pop("ok", None)
    if args.json:
        print(json.dumps(status))
        return 0
    voices = status.get("voices", {})
    requests = status.get("requests", {})
    cache = status.get("cache", {})
    lines = [
        f"voiced {status.get('version')}  up {status.get('uptime_s', 0):.0f}s  pid {status.get('pid')}",
        f"model    {status.get('model')} on {status.get('device')}",
        "voices   " + ", ".join(f"{n} {k}" for k, n in voices.items()),
        f"queue    {status.get('queue')} synthesis, {status.get('preparation_queue')} preparation, "
        f"{status.get('settling', 0)} files settling",
        f"requests {requests.get('served')} served, {requests.get('failed')} failed, {requests.get('busy')} busy; "
        f"p50 {requests.get('latency_p50_ms')} ms, p99 {requests.get('latency_p99_ms')} ms",
        f"memory   RSS {status.get('rss_bytes', 0) / 2**20:.0f} MiB, GPU {status.get('gpu_memory_bytes')}, "
        f"CPU {status.get('cpu_percent')}%",
        f"cache    {cache.get('entries')} entries, {cache.get('bytes', 0) / 2**20:.1f} MiB, hit rate {cache.get('hit_rate')}",
    ]
    print("\n".join(lines))
    return 0

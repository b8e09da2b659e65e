"""The hooks a plugin implements (pluggy project name ``voiced``), each documented here.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names are the
hook names below. A plugin implements only the hooks it needs, and may accept only a subset
of a hook's arguments (pluggy passes arguments by name)::

    from voiced.hooks import hookimpl

    @hookimpl
    def voiced_postprocess_audio(audio, sample_rate):
        return audio * 0.5

How hooks are called (see :class:`voiced.hooks.PluginHost`):

* **Order.** Every hook calls its implementations in one defined order, not pluggy's LIFO:
  the plugins ``[plugins] enabled`` names, in that order (the first-party ones and any declared
  in the entry-point group ``voiced.optional``), then modules from ``[plugins] paths`` by name,
  then installed packages (entry-point group ``voiced``) by name.
  The chained hooks (``voiced_preprocess_text``, ``voiced_postprocess_audio``) hand each
  plugin the previous one's output; returning ``None`` means "unchanged".
* **Errors.** A plugin that raises never takes the daemon down. What happens is documented per
  hook; for the request-path hooks the error is logged with the plugin's name and the request
  fails with ``internal`` naming the plugin (:class:`voiced.hooks.PluginError`), unless the
  plugin's table says ``on_error = "skip"``: then that plugin is skipped for that call, with a
  warning in the log.
* **Threads.** Hooks run on the daemon's threads (named below); a plugin that keeps state
  across hooks of different threads must lock it. With ``[server] synthesis_threads`` above 1,
  requests run side by side and the synthesis hooks of different requests may run at once.
* **Cost.** The synthesis hooks run inside the request's latency; every call is timed per
  plugin, and the totals are in the ``status`` op's ``plugins`` field.
  ``VOICED_TRACE_PLUGINS=1`` logs every call with its duration.
* **Unknown hooks.** A ``@hookimpl`` whose name matches no hook below (a typo) stops the
  daemon at start with the plugin's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from voiced.engines.base import Engine, SpeakerEncoder
    from voiced.protocol import Reply, Synthesize

PROJECT = "voiced"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class EngineContext:
    """What an engine factory gets to build an engine (constructed, not loaded yet)."""

    cache_dir: Path
    """The daemon's cache folder; engines keep downloaded weights below ``models_dir``."""
    encoder: SpeakerEncoder | None
    """The loaded speaker encoder (GE2E, ``voiced.encoder.SpeakerEncoder``): 256-d embeddings."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """``[engine] options`` from the config, as written. A factory raising TypeError for an
    unexpected option is reported as a config error naming ``[engine] options``."""
    device: str = "auto"
    """``[engine] device``; the daemon passes it to ``engine.load()`` afterwards."""

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"


EngineFactory = Callable[[EngineContext], "Engine"]
RegisterEngine = Callable[[str, EngineFactory], None]


# ---------------------------------------------------------------------- start-up and shutdown


@hookspec
def voiced_register_engines(register: RegisterEngine) -> None:
    """Register synthesis engines: call ``register(name, factory)`` once per engine.

    Runs once at start-up, on the main thread, before any engine is built. ``factory`` is
    called with an :class:`EngineContext` only if ``[engine] name`` selects ``name``, and must
    return a :class:`voiced.engines.base.Engine`, constructed but not loaded (the daemon loads
    and warms it). The built-in Kokoro engine registers through this hook too
    (``voiced.hooks.builtin``). Two plugins registering one name is a start-up error naming
    both. Return value: ignored. Raising: the daemon does not start (the error names the plugin).
    """


@hookspec
def voiced_startup(daemon_info: dict[str, Any]) -> None:
    """The daemon is up: engine loaded, library started, sockets bound, just before READY.

    Runs once on the main thread. ``daemon_info`` has ``version``, ``pid``, ``endpoints``,
    ``engine`` (``name@version``), ``device``, ``sample_rate``, ``voices_dir``, ``cache_dir``,
    ``config`` (the config file or None). Return value: ignored. Raising: with the default
    ``on_error = "fail"`` the daemon does not start (the error names the plugin); with
    ``"skip"`` a warning is logged and start-up goes on.
    """


class SynthesisService(Protocol):
    """The way in that ``voiced_serve`` hands a plugin opening another front door."""

    @property
    def sample_rate(self) -> int:
        """The engine's sample rate (what ``sample_rate`` is when a request leaves it out)."""

    def voices(self) -> list[dict[str, Any]]:
        """Every voice as the ``voices`` op lists it (``name``, ``state``, ``stage``...)."""

    def submit(self, request: Synthesize, reply: Reply, *, request_id: Any = None) -> None:
        """Speak ``request`` on the daemon's own path: the same limits, queue, voices, hooks and
        synthesis threads as a ZeroMQ request. Safe from any thread. Raises
        :class:`voiced.protocol.ProtocolError` when refused at once (over a limit, ``busy``, an
        unknown or failed voice, a voice not ready without ``wait_s``); otherwise the answer goes
        to ``reply`` (:class:`voiced.protocol.Reply`), called from the synthesizing thread."""


@hookspec
def voiced_serve(service: SynthesisService) -> None:
    """Open another front door (an HTTP API, a Wyoming service...) onto the daemon.

    Runs once on the main thread, after the ZeroMQ sockets are bound and before
    ``voiced_startup``. Start listening here, on threads of the plugin's own, and stop in
    ``voiced_shutdown``; requests go through ``service.submit``. Raising: as ``voiced_startup``
    (the daemon does not start, unless the plugin says ``on_error = "skip"``).
    """


@hookspec
def voiced_shutdown() -> None:
    """The daemon is stopping: requests drained, before the cache is closed.

    Runs once on the main thread; release files, threads and connections here. Return value:
    ignored. Raising: logged with the plugin's name; the other plugins still get the call.
    """


# ---------------------------------------------------------------------- synthesis path


@hookspec
def voiced_preprocess_text(text: str, voice: str, params: dict[str, Any]) -> str | None:
    """Rewrite the text of a synthesis request before the engine turns it into phonemes.

    Runs on the thread that runs the model for this request (``voiced-server-N``), once per request, before any
    audio. Chained: each plugin gets the previous one's output. ``voice`` is the voice's name;
    ``params`` the request's engine params (read-only by convention). Return the new text, or
    None to leave it unchanged; anything else is an error. Raising: the request fails with
    ``internal`` naming the plugin, unless its ``on_error = "skip"``.
    """


@hookspec
def voiced_postprocess_audio(audio: np.ndarray, sample_rate: int, request: dict[str, Any]) -> np.ndarray | None:
    """Process synthesized audio before it is encoded and sent.

    Runs on the synthesis worker thread. Chained: each plugin gets the previous one's output.
    ``audio`` is mono float32 in [-1, 1] (values outside are clipped by the encoder) at
    ``sample_rate`` (the engine's rate, not the rate the client asked for). Return a 1-D float
    array (any length: trimming and padding are fine), or None to leave it unchanged. Do not
    modify ``audio`` in place; return a new array.

    ``request``: ``key`` (unique per synthesis, the same for every chunk of a stream), ``id``
    (the client's id, may be None), ``text`` (as received), ``spoken_text`` (after
    pre-processing), ``voice`` (``{name, sha256, stage?}``), ``params``, ``format``,
    ``stream`` (bool), ``seq`` (0, 1, ...), ``final`` (bool).

    Whole replies (``stream`` false): called once with the whole signal, ``seq`` 0 and
    ``final`` true, so a plugin can measure everything (loudness, silences at both ends).

    Streamed replies (``stream`` true): called once per chunk as the engine yields it
    (``final`` false), then once more with an empty array and ``final`` true, where a plugin
    may return a tail (e.g. padding); chunks already sent cannot be changed. A plugin that
    needs the whole signal must decide from what it has: e.g. ``loudness`` fixes its gain
    from the first chunk (keyed by ``request["key"]``) and keeps it for the rest of the stream;
    ``trim`` trims and fades the start of chunk 0 and pads the end on the final call.

    Raising: the request fails with ``internal`` naming the plugin (a stream that already sent
    chunks ends with an error message), unless its ``on_error = "skip"``.
    """


@hookspec
def voiced_synthesis_done(request: dict[str, Any], audio: np.ndarray, sample_rate: int, timings: dict[str, Any]) -> None:
    """A synthesis reply was sent: ``audio`` is what the client got, after post-processing.

    Runs on the synthesis worker thread after the last message is handed to the socket, so
    it does not delay that reply (but it delays the next queued request: keep it short, or
    hand the work to a thread of your own). Not called for failed requests. ``request`` is as
    for ``voiced_postprocess_audio`` (``final`` true); ``audio`` is the whole reply (streamed
    chunks concatenated) at ``sample_rate`` (the engine's); ``timings`` has ``queue_s``,
    ``engine_s``, ``total_s``, ``duration_s``. Return value: ignored. Raising: logged with the
    plugin's name, never propagated (the reply is already sent).
    """


# ---------------------------------------------------------------------- voice lifecycle


@hookspec
def voiced_voice_ready(voice: dict[str, Any]) -> None:
    """A voice can be spoken: prepared now, or found in the cache (at start, after a rename).

    ``voice`` is the ``voices`` op's entry: ``name``, ``state``, ``file``, ``sha256``,
    ``duration_s``, ``stage?``, ``note?``. May be called again for the same voice when its
    file changes. Runs on the preparation worker or the folder watcher's thread. Return
    value: ignored. Raising: logged with the plugin's name, never propagated.
    """


@hookspec
def voiced_voice_failed(voice: dict[str, Any]) -> None:
    """A voice cannot be prepared; ``voice["error"]`` says why (too short, unreadable, ...).

    Threads, return value and errors as for ``voiced_voice_ready``.
    """


@hookspec
def voiced_voice_removed(voice: dict[str, Any]) -> None:
    """A voice's file was deleted (or renamed away, or became unusable) and the voice is gone.

    ``voice`` is its last known entry. Threads, return value and errors as for
    ``voiced_voice_ready``.
    """

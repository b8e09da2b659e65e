"""The ZeroMQ front door: the ROUTER transport (:mod:`.router`) and admission (:mod:`.admission`)."""

from voiced.protocol import Reply
from voiced.server.admission import Admission, Job
from voiced.server.router import Backend, Server, ServerStats

__all__ = ["Admission", "Backend", "Job", "Reply", "Server", "ServerStats"]

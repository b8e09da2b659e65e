"""Admission without a socket: reserve, queue, busy, and requests waiting for their voice."""

from __future__ import annotations

import time

import pytest
from fakes import Shelf

from voiced.protocol import BUSY, VOICE_FAILED, VOICE_NOT_READY, ProtocolError, Synthesize
from voiced.server import Admission, Job


def job(voice: str, wait_s: float = 0.0, n: int = 0) -> Job:
    # no reply: admission never answers a job, the server does
    return Job(None, n, Synthesize(text="Hi.", voice=voice, wait_s=wait_s), time.monotonic())


def test_the_first_job_is_reserved_then_queued_then_busy() -> None:
    admission = Admission(Shelf(a="ready"), synthesizers=1, queue_size=2)
    for n in range(3):
        admission.admit(job("a", n=n))
    with pytest.raises(ProtocolError) as caught:
        admission.admit(job("a", n=3))
    assert caught.value.code == BUSY and admission.busy == 1
    assert admission.depth() == 3  # one running (reserved), two queued
    first = admission.take()
    assert first is not None and first.id == 0 and first.conditioning == "conditioning of a"
    assert admission.take() is None  # the only synthesizer is busy with it
    assert [admission.next().id, admission.next().id] == [1, 2]  # the same thread runs what queued meanwhile
    assert admission.next() is None and admission.depth() == 0 and admission.idle()


def test_two_synthesizers_take_queued_jobs_side_by_side() -> None:
    admission = Admission(Shelf(a="ready"), synthesizers=2, queue_size=4)
    admission.admit(job("a", n=0))
    admission.admit(job("a", n=1))  # queued: the leader holds a reservation already
    assert admission.take().id == 0
    assert admission.take().id == 1  # a second synthesizer is free
    assert admission.take() is None


def test_a_voice_not_ready_is_refused_or_waited_for() -> None:
    shelf = Shelf(a="preparing")
    admission = Admission(shelf, synthesizers=1, queue_size=2)
    with pytest.raises(ProtocolError) as caught:
        admission.admit(job("a"))
    assert caught.value.code == VOICE_NOT_READY and caught.value.details == {"state": "preparing"}
    admission.admit(job("a", wait_s=30, n=1))
    admission.admit(job("new", wait_s=30, n=2))  # a file just dropped: not known yet
    assert admission.waiting and not admission.idle() and admission.recheck() == []
    shelf.states.update(a="ready", new="ready")
    assert admission.recheck() == [] and not admission.waiting
    assert admission.take().id == 1 and admission.next().id == 2


def test_waiting_ends_at_the_deadline_or_when_the_voice_fails() -> None:
    shelf = Shelf(a="preparing", b="preparing")
    admission = Admission(shelf, synthesizers=1, queue_size=2)
    admission.admit(job("a", wait_s=0.05, n=1))
    admission.admit(job("b", wait_s=30, n=2))
    time.sleep(0.1)
    shelf.states["b"] = "failed"
    refused = {j.id: exc.code for j, exc in admission.recheck()}
    assert refused == {1: VOICE_NOT_READY, 2: VOICE_FAILED} and admission.idle()


def test_nothing_is_admitted_once_stopping() -> None:
    admission = Admission(Shelf(a="ready"), synthesizers=1, queue_size=2)
    admission.admit(job("a", n=0))
    admission.admit(job("a", n=1))
    admission.stop_accepting()
    with pytest.raises(ProtocolError) as caught:
        admission.admit(job("a"))
    assert caught.value.code == BUSY
    assert admission.take().id == 0
    assert admission.next(drop=True) is None and admission.idle()  # a stopping server forgets the queue

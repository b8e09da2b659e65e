"""The voice library: the watched folder's recordings, their states and their preparation."""

from voiced.library.library import Library, ReconcileReport, VoiceListener
from voiced.library.voice import Voice, VoiceState, is_candidate, voice_name

__all__ = ["Library", "ReconcileReport", "Voice", "VoiceListener", "VoiceState", "is_candidate", "voice_name"]

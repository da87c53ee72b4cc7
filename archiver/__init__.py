"""voipbin-archiver: archive VoIPbin call recordings to storage you own, verified and resumable."""

__version__ = "0.1.0"

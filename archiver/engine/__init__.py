"""The engine, split by concern: ``walker`` (the listing into the state), ``feeder`` (due work
to a bounded queue), ``workers`` (resolvers and download workers), ``core`` (the lifecycle:
backfill, serve, shutdown, deletions), ``base`` (what they share, and trouble handling)."""

from .base import SHUTDOWN_GRACE, RunResult
from .core import Engine

__all__ = ["SHUTDOWN_GRACE", "Engine", "RunResult"]

"""The o2u gRPC server: runs O2U-Net noise-scoring jobs on datasets named by URI and serves their
progress and ranked results (o2u.v1.ScoringService). `create_server` builds a complete server."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

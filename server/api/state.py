"""What the routes share: settings, the engine and the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.config import Settings
from server.engine import Engine
from server.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    metrics: Metrics
    started_at: int = field(default_factory=lambda: int(time.time()))

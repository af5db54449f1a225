"""What the routes share: settings and the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.config import Settings
from server.engine import Engine


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    started_at: int = field(default_factory=lambda: int(time.time()))

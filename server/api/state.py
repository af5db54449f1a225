"""What the routes share: settings, the engine and the drain state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.api.drain import Drain
from server.config import Settings
from server.engine import Engine


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    drain: Drain = field(default_factory=Drain)
    started_at: int = field(default_factory=lambda: int(time.time()))

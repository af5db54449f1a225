"""`vlserve doctor`: check a box before serving on it, and say what is wrong in one line each.

Static checks first (build, GPUs, files, checksums, GGUF kinds, chat template), then one text
and one image request through the real engine, with stage timings and where each ran.
"""

from server.doctor.report import Check, Report

__all__ = ["Check", "Report"]

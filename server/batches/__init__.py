"""Batch jobs (OpenAI's Batch API and `vlserve batch`): a JSONL file of requests, run at
lower priority than interactive requests, with inputs, state and results on disk.

store.py keeps files and state; lines.py reads input lines; job.py is one batch's status
machine; runner.py feeds lines to the engine; call.py runs one line through the app;
offline.py and command.py are the command line.
"""

"""Batch jobs (OpenAI's Batch API and `vlserve batch`): a JSONL file of requests, run at
lower priority than interactive requests, with inputs, state and results on disk (or in
Redis, shared by every replica, with a shared `state_url`).

store.py keeps files and state on disk, redis_store.py in Redis; leases.py decides which
replica runs a batch on Redis; lines.py reads input lines; job.py is one batch's status
machine; runner.py feeds lines to the engine; views.py is what the API reads; call.py runs
one line through the app; offline.py and command.py are the command line.
"""

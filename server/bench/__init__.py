"""`vlserve bench`: time text and image requests against a running server, at rising
concurrency, and name the bottleneck from the per-stage timings the server returns."""

"""`vlserve bench soak`: many clients on loopback for a bounded time, mixing good, bad and
abandoned requests; nothing may be lost and the server may not grow."""

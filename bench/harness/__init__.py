"""Shared machinery of the benchmarks: child processes spoken to in JSON lines, /proc
sampling, the wire tap between callers and the system under test, simulated callers."""

"""Top-level commands that tie the domain-agnostic core (compress, runtime, serve, bench) to a
workload: the only modules, with the workload packages themselves, that may import both."""

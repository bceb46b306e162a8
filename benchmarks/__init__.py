"""pleaco's benchmarks, against Docker Swarm on the same engine where there is a baseline.

Run them all with ``python -m benchmarks`` (``make bench``); see benchmarks/README.md.
Each benchmark module has a ``run(opts) -> list[Row]`` and cleans up everything it started
(agents, containers, the Swarm service, Swarm mode itself) even when it fails.
"""

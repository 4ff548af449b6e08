"""The torch-free base every other package builds on: the exception root, id and name rules, Kafka
settings and the embedded broker, option defaults from the environment.

It imports nothing of this project and nothing heavy, so ingest, monitoring and ``cff-inspect --help``
start without loading torch. Layering (checked by ``lint-imports``): inspection_core <- scorer <- services
(ingest, workers, calibrator, monitoring) <- benchmarks <- cff_inspect.
"""

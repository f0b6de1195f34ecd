"""moonbatch's benchmark suite: ``python -m bench [NAME ...] [--write]``.

Every benchmark runs against local servers started in this process (moto's S3 server, the Batch
API emulator) or in child processes it starts itself (Celery workers, memory probes), and prints
its numbers next to a baseline measured in the same run on the same servers. ``--write`` rewrites
BENCHMARKS.md with the results and the machine they ran on.
"""

"""The backfill's performance benchmark: ``python -m bench`` (see ``bench.__main__``).

``bench.scenarios`` runs one scenario per process; ``bench.upstream`` is the baseline loop;
``bench.common`` holds the meters; ``bench.data`` seeds; ``bench.report`` prints the tables.
"""

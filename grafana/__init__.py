"""The Grafana dashboard of the layer-cache backfill, generated from code (see ``dashboard``).

This folder is a dev-only package of the repository, not shipped in the wheel, so it never
meets the unrelated ``grafana`` distribution on PyPI; run it from the repository root.
"""

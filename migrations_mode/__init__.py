"""The backfill migration mode: copy layer-cache rows from Postgres into the S3 buckets.

``config`` validates the options, ``checkpoint`` is the pure resume rule, ``cache_backfill`` the
per-cache pipeline (``row_action`` what each row needs per verify mode, ``progress_saver`` and
``estimates`` beside it), ``coordinator`` runs every selected cache in one task group, and
``summary`` reports what happened.
"""

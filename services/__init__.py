"""The process around the layer cache: settings, services context, signals, logs, telemetry.

Only plumbing lives here; the products sit above it (``migrations_mode``, ``layer_cache_server``,
and the command line, ``si_layer_cache.cli``) and ``services`` never imports them, except
``services.__main__``, which keeps ``python -m services`` as the documented command.
"""

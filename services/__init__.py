"""The process around the layer cache: settings, services context, signals, logs, telemetry.

``python -m services`` (or the ``si-layer-cache`` script) parses flags, loads one ``Settings``
tree, and then either runs a migration mode (``runAndQuit``, ``backfillLayerCache``) or serves
the layer cache HTTP API (``run``, ``skip``; see ``services.server``).
"""

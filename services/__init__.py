"""The process around the layer cache: settings, services context, signals, logs, telemetry.

``python -m services`` (or the ``si-layer-cache`` script) parses flags, loads one ``Settings``
tree, and then either runs a migration mode or (in a later issue) the layer cache server.
"""

"""The layer cache HTTP API (``layer_cache_server.server``), served in ``run`` and ``skip`` modes.

It sits beside ``migrations_mode``: both use the process plumbing in ``services`` and the library
in ``layer_cache``, and neither imports the other or the command line (``si_layer_cache``).
"""

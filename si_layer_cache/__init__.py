"""The si-layer-cache program: the command line on top of the server, the backfill and the process.

``si_layer_cache.cli`` parses flags, loads one ``Settings`` tree and runs the chosen mode: a
migration mode (``migrations_mode``) or the layer cache HTTP API (``layer_cache_server``). It is
the only package allowed to import both; nothing imports it (``services.__main__`` delegates here
so ``python -m services`` stays the documented command).
"""

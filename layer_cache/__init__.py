"""The layer cache library: what a cache type is and where its bytes live.

`cache_types` is the one registry of cache types, `keys` the pure naming rules for buckets and
object keys, `pg` and `s3` the two storage layers, and `errors` the one error tree. Nothing in
this package reads the environment or opens a connection at import time; it never imports
`services` or `migrations_mode`.
"""

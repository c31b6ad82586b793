"""The Kubernetes manifests of the layer cache, rendered from one values file (``deploy.render``).

A folder of the repository run from its root (``python -m deploy.render``), not a package of
the wheel or the image.
"""

"""The ``llava-features`` command line: the one layer that imports both front doors.

``pipeline`` (the model, images, the encoder and the offline job) and ``deployments`` (the Ray
Serve endpoint) never import this package or each other upward; :mod:`llava_features.cli` does
both, lazily, per subcommand. Nothing is imported here.
"""

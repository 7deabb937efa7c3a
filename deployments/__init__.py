"""The online endpoint: a Ray Serve application around :class:`pipeline.encoder.FeatureEncoder`.

- ``deployments.app``: the deployment (encoder replicas that serve the HTTP API themselves, with
  admission, a decode budget and dynamic batching) and ``build_app``, the application builder
  named by ``configs/serve.yaml``.
- ``deployments.http``: error → HTTP status mapping, bounded body reading, response encoders,
  data URLs, the API key check (no Ray imports).
- ``deployments.launch``: ``llava-features serve`` (:func:`~deployments.launch.serve_forever`).
- ``deployments.listen``: where Serve's HTTP proxy listens, announced when the app is built or up.
- ``deployments.bench``: ``llava-features bench serve`` (the endpoint against the in-process encoder).

This layer imports ``pipeline``; ``pipeline`` never imports it, not even by a string. The command
line (``llava_features``) is the only layer above both.
Nothing is imported here, so ``import deployments`` stays cheap.
"""

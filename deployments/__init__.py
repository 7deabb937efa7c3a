"""The online endpoint: a Ray Serve application around :class:`pipeline.encoder.FeatureEncoder`.

- ``deployments.app``: the deployment (encoder replicas that serve the HTTP API themselves) and
  ``build_app``, the application builder named by ``configs/serve.yaml``.
- ``deployments.build``: our config from ``build_app``'s args, the deployment's options from it.
- ``deployments.replica``: one replica: encoder, decode, batching, counters, the offline job's files.
- ``deployments.scheduling``: admission, the decode pixel budget, the device queue (no Ray).
- ``deployments.routes`` behind ``deployments.router``: the HTTP routes, and a thin ASGI router
  (auth, body deadline, admission, timeouts, errors, metrics).
- ``deployments.result``, ``deployments.metrics``, ``deployments.offline``: what encoding an image
  gives, the replica's Prometheus metrics, the offline job's files on a replica.
- ``deployments.autoscaling``: both doors' load as the replicas report it, and the policy.
- ``deployments.http``: error → HTTP status mapping, bounded body reading, response encoders,
  data URLs, the API key check (no Ray imports).
- ``deployments.launch``: ``llava-features serve`` (:func:`~deployments.launch.serve_forever`).
- ``deployments.listen``: where Serve's HTTP proxy listens, announced when the app is built or up.
- ``deployments.bench``: ``llava-features bench serve`` (the endpoint against the in-process encoder).

This layer imports ``pipeline``; ``pipeline`` never imports it, not even by a string. The command
line (``llava_features``) is the only layer above both.
Nothing is imported here, so ``import deployments`` stays cheap.
"""

"""Serving generation artifacts over HTTP on Ray Serve (`elision serve`; needs the `serve` extra: ray[serve]).

    from elision.apps.serve.service import Service, ServeOptions
    with Service("gen/", ServeOptions(replicas=2)) as service:
        ...  # OpenAI-compatible POST {service.url}/v1/completions, GET /v1/models, GET /healthz

protocol (requests, responses, stream events; no Ray) · stop_text (stop strings in returned text) · job (the
generation thread <-> request bridge, cancellation) · replica (one OrtGenerator per replica, its requests
decoded together with continuous batching: elision.runtime.generation.continuous) · ingress (the HTTP front) · service (local Ray or a cluster; start and stop).
"""

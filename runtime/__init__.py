"""vlmserve's runtime: the ``vlmserve`` command line (``runtime.cli``), the KServe model server
(``runtime.server``: OpenAI routes, KServe v2 REST/gRPC) and the bundled demo checkpoint
(``runtime.demo_model``)."""

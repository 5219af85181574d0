"""vlmserve's runtime: the ``vlmserve`` command line (``runtime.cli``), the bundled demo checkpoint
(``runtime.demo_model``) and, later, the KServe model server."""

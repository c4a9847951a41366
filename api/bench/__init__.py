"""The benchmarks (``promptstore bench engine|serve|dashboard|accuracy``), apart from the service.

No production module imports this package (a test checks it); the command line imports
each benchmark lazily, when its command runs. Modules:

  ``engine``     ``bench engine``: the mixed-tenant forward against per-method batches and the tower
  ``serve``      ``bench serve``: the whole service under HTTP load against its baselines
  ``loadgen``    the raw HTTP/1.1 load generator of ``bench serve`` (a process of its own)
  ``baselines``  what ``bench serve`` compares with, each an app or a state of its own
  ``dashboard``  ``bench dashboard``: server render time of the admin pages with a full index
  ``accuracy``   ``bench accuracy``: held-out accuracy of every method's defaults and of auto on Fashion-MNIST
  ``seeding``    random prompts and ready tasks published through the store (shared with the tests)
  ``harness``    the service on uvicorn in a thread, and the machine description of a result
"""

"""The job store's implementations (:class:`colmap_pipeline.jobs.JobStore`): ``sqlite``
(embedded mode, one file) and ``postgres`` (``DATABASE_URL``, several replicas).

Only ``database.py`` (the one entry, ``open_store``) and ``main.py`` import this package
(``tests/test_architecture.py``): the web, intake and runner code see the protocol only.
"""

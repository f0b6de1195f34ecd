"""moonbatch producer: reads the INPUT listing, plans shards, records the run and enqueues it;
also the ``moonbatch`` command line (``producer.cli``)."""

if __name__ != "moonbatch.producer":  # one module, one name: never two Celery apps or two Settings
    raise ImportError(f"import moonbatch.producer, not {__name__}")


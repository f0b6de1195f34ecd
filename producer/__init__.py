"""moonbatch producer: reads the INPUT listing, plans shards, records the run and enqueues it;
also the ``moonbatch`` command line (``producer.cli``)."""

"""``python -m moonbatch``: the command line."""
from moonbatch.producer.cli import main

main()

"""``python -m trioserve.replica``: see :mod:`trioserve.replica.process`."""

from trioserve.replica.process import main

main()

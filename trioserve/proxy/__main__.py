"""``python -m trioserve.proxy``: see :mod:`trioserve.proxy.process`."""

from trioserve.proxy.process import main

main()

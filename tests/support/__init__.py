"""What the tests share, in one place: no test module imports another.

``processes``   ``deliverylab`` processes started, read and stopped; a child's environment
``worker_script``  a script the tests run as processes: a worker, or a claimer, by hand
``engine``      ``EngineRig``: a store, a FakeClock, ids and a queue, driven by hand
``brokers``     every broker engine the contract and the worker's broker tests run against
``cli``         the ``deliverylab`` command run in process
``servers``     a NATS server of a test's own, and a proxy that holds or cuts a link
``pg``, ``pg_gate``, ``pg_cluster``  the PostgreSQL test server, a TCP gate in front of it,
                and a PostgreSQL server of a test's own
``pages``       the README and the "Running the lab" pages, read as text
``built_book``  the built HTML book: its pages, a local server, Chromium and the checks
``book_server`` a static server for the built book
``jupyterlab``  a JupyterLab server on a copy of the chapters
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

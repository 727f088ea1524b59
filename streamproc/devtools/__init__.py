"""Development tools, apart from the serving path: the local broker and the benchmark.

Nothing under ingest/, admission/, engine/, publish/, flow/ or worker/ imports from here
(a test checks it)."""

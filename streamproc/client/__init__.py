"""The async Python client: submit prompts, iterate their token chunks."""

from streamproc.client.client import Result, ResultStream, StreamprocClient

__all__ = ["Result", "ResultStream", "StreamprocClient"]

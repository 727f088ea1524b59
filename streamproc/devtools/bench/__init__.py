"""``streamproc bench``: the same recorded trace through real Kafka against each peer."""

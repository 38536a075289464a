"""Recognising model files from their bytes: shared by the registry (which registers a path)
and the nodes (which size and load what they fetched), so neither imports the other. No NATS,
no engine libraries: the base install reads every header it needs."""

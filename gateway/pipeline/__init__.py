"""The scan pipeline, one way: the stream record and its format (``events``), every Redis
key (``keyspace``), the durable buffer the HTTP handlers append to (``buffer``), and the
flusher that moves batches into storage (``flusher``)."""

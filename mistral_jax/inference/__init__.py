"""Running a trained model: token selection, chunked prefill into the rolling cache, the
compiled decode loop, generate; continuous batching of requests over slots of one cache."""

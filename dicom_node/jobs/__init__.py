"""Jobs: complete studies (``assembly``), route their series to models (``routing``), run them (``worker``,
models kept loaded by ``model_cache``)."""

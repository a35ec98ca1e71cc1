"""`mlxft serve`: an OpenAI-compatible HTTP server for a model and the runs trained on it
(engine: the model and generation; protocol: the API's shapes; app: the HTTP routes)."""

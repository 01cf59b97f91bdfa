"""The OpenAI-compatible HTTP server (`ulskip serve`): FastAPI routes over the continuous-batching scheduler."""

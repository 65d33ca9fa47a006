"""The HTTP edge: OpenAI/NIM-compatible routes, health, version, metrics. Pydantic lives only here."""

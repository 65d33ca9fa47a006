"""Between the HTTP edge and the executor: the adapter catalog, the host PEFT cache, the orchestrator."""

"""Executors: the engine contract (api.py) and its implementations (torch/ reference engine, trtllm.py)."""

"""The engine directory: build it from a base model (build.py), read it (engine_dir.py), size it (memory.py)."""

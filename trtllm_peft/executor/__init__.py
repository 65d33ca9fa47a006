"""Executors: the engine contract (api.py) and its implementations (torch/ reference engine, trtllm.py over
TensorRT-LLM, whose type mapping is trtllm_convert.py)."""

"""The engine simulator behind `llm-gateway sim`: vLLM, SGLang and llama.cpp dialects over one engine model.

The model (running batch, FIFO queue, KV blocks, exact prefix cache, step timing) lives in `engine.py`,
the HTTP surface of each dialect in `server.py`, and every flag with its default in `config.py`.
"""

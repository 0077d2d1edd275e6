"""`megatron-qwen serve`: an OpenAI-compatible HTTP server over the KV-cache engine, at any TP/PP layout.

`protocol` (requests, responses, errors: no model), `batching` (the queue, how batches form, each row's text),
`worker` (the ranks' loop), `http` (aiohttp on rank 0).
"""

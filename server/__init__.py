"""OpenAI-compatible HTTP server: Quart app (app.py), protocol models, routes, metrics. Started by jaxllm.serve."""

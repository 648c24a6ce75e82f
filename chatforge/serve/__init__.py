"""Serving: an OpenAI-compatible server with continuous batching (app.py lists its parts;
scheduler.py), a web chat page (web/), and the feedback store that turns rated conversations into
training data (feedback.py)."""

"""The Ray Serve inference service: request model, scoring, prediction log, metrics, app.

Everything but `app` is plain Python with no Ray import, so it is tested without a cluster.
"""

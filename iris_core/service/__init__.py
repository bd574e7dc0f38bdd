"""Segmentation as a service: the server (FastAPI + uvicorn) and a standard-library client."""

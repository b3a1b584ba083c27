"""Requests, responses, tensor signatures and their validation."""

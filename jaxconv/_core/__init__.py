"""The base layer: argument checks, N-d window geometry and strict JSON.

Below both the ops and their computational forms; imports nothing else of jaxconv.
"""

"""The surge replay: a shop's traffic spike replayed with and without cachelayer.

Run it with ``cachelayer surge`` (or ``python -m cachelayer surge``); ``benchmarks/surge.py``
exposes every knob. Nothing here is imported by ``import cachelayer``: it needs the ``surge``
extra (starlette, httpx; uvicorn and asyncpg for the served and PostgreSQL variants).
"""

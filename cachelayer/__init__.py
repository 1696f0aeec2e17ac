"""cachelayer: a read-through cache (in-process L1 + Redis L2) that keeps databases alive
during traffic surges.

    from cachelayer import Cache

    cache = Cache(redis="redis://127.0.0.1:6379/0", namespace="shop", ttl=60)

    @cache.cached(ttl=30, key="product:{product_id}", tags=("catalog",))
    async def get_product(product_id: int) -> dict: ...
"""

from ._cache import Cache, Loaded
from .exceptions import (
    BackendError,
    CacheError,
    ConfigurationError,
    InvalidKeyError,
    LoadTimeoutError,
    OriginOverloadedError,
    SerializationError,
)

__all__ = [
    "BackendError",
    "Cache",
    "CacheError",
    "ConfigurationError",
    "InvalidKeyError",
    "LoadTimeoutError",
    "Loaded",
    "OriginOverloadedError",
    "SerializationError",
]
__version__ = "0.1.0"

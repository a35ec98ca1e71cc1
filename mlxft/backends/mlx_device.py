"""The MLX backend's device side: Metal's wired working set and the buffer-cache limit, and what the
backend reports (device, dtype, peak memory)."""

from __future__ import annotations


class MLXDeviceInfo:
    """MLXBackend's device methods (a mixin: it reads the backend's `mx`, dtype and cache limit)."""

    def _metal(self) -> bool:
        try:
            return bool(self.mx.metal.is_available())
        except Exception:
            return False

    def _setup_device(self) -> None:
        """On Metal: wire the recommended working set as mlx-lm does; size the cache limit."""
        mx = self.mx
        try:
            if self._metal():
                from mlx_lm.utils import maybe_set_recommended_wired_limit

                maybe_set_recommended_wired_limit()
                size = mx.device_info().get("max_recommended_working_set_size")
                if size:
                    self._cache_limit = int(size) // 4
        except Exception:  # never fatal: the limit is an optimisation
            pass

    def _maybe_clear_cache(self) -> None:
        mx = self.mx
        try:
            if mx.get_cache_memory() > self._cache_limit:
                mx.clear_cache()
        except AttributeError:
            pass

    def device_name(self) -> str:
        mx = self.mx
        try:
            if mx.metal.is_available():
                return f"metal ({mx.device_info().get('device_name', 'Apple GPU')})"
            if hasattr(mx, "cuda") and mx.cuda.is_available():
                return "cuda (mlx)"
        except Exception:
            pass
        return "cpu (mlx)"

    def dtype_name(self) -> str:
        return str(self.dtype).replace("mlx.core.", "") if self.dtype is not None else "float32"

    def peak_memory(self):
        try:
            peak = int(self.mx.get_peak_memory())
        except AttributeError:
            return None
        return peak or None

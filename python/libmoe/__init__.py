"""libmoe - a ctypes binding of libmoe's C API (one Mixture-of-Experts layer, forward and
backward, and an optimizer). The shared library is found through $LIBMOE_PATH, next to this
package, or in the build/ directory of the source tree. libmoe.torch (a PyTorch module) and
libmoe.reference (the same layer in plain torch) need torch and are imported on their own."""
from ._lib import lib_path
from .api import (ALLOC_FAILED, INVALID_ARGUMENT, NOT_SUPPORTED, NUMERIC_ERROR, SUCCESS, Context,
                  Layer, MoeError, Optimizer, layer_config, version)

__all__ = ["Context", "Layer", "Optimizer", "MoeError", "layer_config", "version", "lib_path",
           "SUCCESS", "INVALID_ARGUMENT", "NOT_SUPPORTED", "ALLOC_FAILED", "NUMERIC_ERROR"]
__version__ = "0.1.0"

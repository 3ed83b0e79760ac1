"""Makes python/ importable without installing the package; libmoe.so is found by the package
itself ($LIBMOE_PATH, next to the package, or build/ of the source tree)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

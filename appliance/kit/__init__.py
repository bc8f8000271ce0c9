"""The kit: the test guest and the Linux kit, built into a cache.

``paths()`` says where the parts are; ``build()`` makes them (what
``appliance kit build`` runs). Tests boot the Linux kit in QEMU TCG through
:class:`appliance.kit.tcg.TcgGuest`.
"""

from appliance.kit.build import KitPaths, build, kit_dir, paths
from appliance.kit.errors import KitError

__all__ = ["KitError", "KitPaths", "build", "kit_dir", "paths"]

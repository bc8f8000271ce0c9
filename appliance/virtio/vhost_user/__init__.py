"""vhost-user, server side: our virtio devices served to another VMM's guest.

``protocol`` parses messages (pure), ``backend`` maps a :class:`VirtioDevice`
onto the front end's rings and memory, ``server`` owns the unix socket.
"""

from appliance.virtio.vhost_user.backend import VhostUserBackend
from appliance.virtio.vhost_user.errors import MemoryMapError, ProtocolError, VhostUserError
from appliance.virtio.vhost_user.server import VhostUserServer

__all__ = ["MemoryMapError", "ProtocolError", "VhostUserBackend", "VhostUserError", "VhostUserServer"]

"""Linux bridges through netlink (pyroute2): create, delete, list, enslave."""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import AsyncIPRoute

from appliance.net.errors import NetError


@dataclass(frozen=True)
class BridgeInfo:
    name: str
    up: bool
    ports: tuple[str, ...]
    addresses: tuple[str, ...]


async def _index(ipr: AsyncIPRoute, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return found[0] if found else None


async def add_bridge(name: str, *, address: str | None = None, up: bool = True) -> None:
    """Create bridge ``name`` (an existing bridge is fine) with an optional ``a.b.c.d/len``."""
    async with AsyncIPRoute() as ipr:
        idx = await _index(ipr, name)
        if idx is None:
            try:
                await ipr.link("add", ifname=name, kind="bridge")
            except Exception as err:
                raise NetError(f"cannot create bridge '{name}'") from err
            idx = await _index(ipr, name)
        assert idx is not None
        if address:
            ip, _, plen = address.partition("/")
            try:
                await ipr.addr("add", index=idx, address=ip, prefixlen=int(plen or 24))
            except Exception as err:
                if "File exists" not in str(err):
                    raise NetError(f"cannot add {address} to '{name}'") from err
        if up:
            await ipr.link("set", index=idx, state="up")


async def del_bridge(name: str) -> bool:
    """Delete bridge ``name``; returns False when it did not exist."""
    async with AsyncIPRoute() as ipr:
        idx = await _index(ipr, name)
        if idx is None:
            return False
        try:
            await ipr.link("del", index=idx)
        except Exception as err:
            raise NetError(f"cannot delete bridge '{name}'") from err
        return True


async def list_bridges() -> list[BridgeInfo]:
    async with AsyncIPRoute() as ipr:
        links = [link async for link in await ipr.link("dump")]
        addrs = [a async for a in await ipr.addr("dump")]
    names = {link["index"]: link.get("ifname") for link in links}
    out = []
    for link in links:
        info = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        if info != "bridge":
            continue
        idx = link["index"]
        ports = tuple(sorted(str(names[x["index"]]) for x in links if x.get("IFLA_MASTER") == idx))
        mine = tuple(
            f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in addrs if a["index"] == idx
        )
        up = bool(link["flags"] & 1)
        out.append(BridgeInfo(str(link.get("ifname")), up, ports, mine))
    return sorted(out, key=lambda b: b.name)

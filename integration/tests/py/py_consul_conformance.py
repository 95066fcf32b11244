"""Drives the tagway dev catalog with py-consul, unchanged.

Run by integration/tests/catalog_py_consul.rs with DEV_CATALOG_ADDR (host:port) and
DEV_CATALOG_TOKEN (the management token) set. Exits non-zero on the first mismatch.
"""

import os
import sys
import threading
import time

import consul

HOST, PORT = os.environ["DEV_CATALOG_ADDR"].rsplit(":", 1)
TOKEN = os.environ["DEV_CATALOG_TOKEN"]


def step(msg):
    print(f"py-consul: {msg}", flush=True)


def later(delay, fn, *args, **kwargs):
    def run():
        time.sleep(delay)
        fn(*args, **kwargs)

    t = threading.Thread(target=run)
    t.start()
    return t


c = consul.Consul(host=HOST, port=int(PORT), token=TOKEN)
anonymous = consul.Consul(host=HOST, port=int(PORT))

step("ACLs: a client without a token is refused")
try:
    anonymous.catalog.services()
    raise AssertionError("anonymous read was allowed")
except consul.ACLPermissionDenied as e:
    assert "Permission denied" in str(e), e

step("leader; agent.self (py-consul sends no token there) is refused as Consul refuses it")
assert c.status.leader() != "", "a leader is known"
try:
    c.agent.self()
    raise AssertionError("agent.self without a token was allowed")
except consul.ACLPermissionDenied as e:
    assert "agent:read" in str(e), e

step("catalog.services before registration")
cat_index, services = c.catalog.services()
assert int(cat_index) > 0
assert "web" not in services, services

step("register a service with tags and a TTL check")
assert c.agent.service.register(
    "web",
    service_id="web-1",
    address="127.0.0.1",
    port=8080,
    tags=["traefik.enable=true", "v1"],
    check=consul.Check.ttl("30s"),
) is True

step("blocking catalog.services returns with a higher index")
new_cat_index, services = c.catalog.services(index=cat_index, wait="30s")
assert int(new_cat_index) > int(cat_index), (new_cat_index, cat_index)
assert sorted(services["web"]) == ["traefik.enable=true", "v1"], services
cat_index = new_cat_index

step("health.service(passing) is empty while the TTL check is critical")
index, nodes = c.health.service("web", passing=True)
assert nodes == [], nodes
index_all, nodes_all = c.health.service("web")
assert len(nodes_all) == 1 and nodes_all[0]["Service"]["Tags"] == ["traefik.enable=true", "v1"]
checks = {ch["CheckID"]: ch for ch in nodes_all[0]["Checks"]}
assert checks["service:web-1"]["Status"] == "critical", checks

step("blocking health.service returns when the check passes")
t = later(0.5, c.agent.check.ttl_pass, "service:web-1", notes="all good")
started = time.monotonic()
new_index, nodes = c.health.service("web", index=index, wait="30s", passing=True)
waited = time.monotonic() - started
t.join()
assert int(new_index) > int(index), (new_index, index)
assert waited >= 0.3, f"returned after {waited:.3f}s: it did not block"
assert len(nodes) == 1, nodes
svc = nodes[0]["Service"]
assert (svc["ID"], svc["Service"], svc["Port"], svc["Address"]) == ("web-1", "web", 8080, "127.0.0.1"), svc
assert svc["Weights"] == {"Passing": 1, "Warning": 1}, svc
out = {ch["CheckID"]: ch for ch in nodes[0]["Checks"]}["service:web-1"]
assert (out["Status"], out["Output"]) == ("passing", "all good"), out
index = new_index

step("a timed-out blocking query returns the same index")
started = time.monotonic()
same_index, same_nodes = c.health.service("web", index=index, wait="1s", passing=True)
assert time.monotonic() - started >= 1.0
assert same_index == index and same_nodes == nodes, (same_index, index)

step("tag filter and maintenance")
_, tagged = c.health.service("web", tag=["v1", "traefik.enable=true"])
assert len(tagged) == 1
_, none = c.health.service("web", tag="v2")
assert none == []
assert c.agent.service.maintenance("web-1", True, reason="deploy") is True
_, nodes = c.health.service("web", passing=True)
assert nodes == [], nodes
assert c.agent.service.maintenance("web-1", False) is True

step("catalog.service and agent.services")
_, entries = c.catalog.service("web")
assert entries[0]["ServiceID"] == "web-1" and entries[0]["ServicePort"] == 8080, entries
assert "web-1" in c.agent.services()

step("deregistration wakes health and catalog watchers; the catalog index grows")
_, nodes = c.health.service("web")
index = _
t = later(0.5, c.agent.service.deregister, "web-1")
new_index, nodes = c.health.service("web", index=index, wait="30s")
t.join()
assert int(new_index) > int(index) and nodes == [], (new_index, index, nodes)
new_cat_index, services = c.catalog.services(index=cat_index, wait="30s")
assert int(new_cat_index) > int(cat_index), (new_cat_index, cat_index)
assert "web" not in services, services

step("catalog.register / deregister of an external node")
assert c.catalog.register(
    "ext-1", "10.0.0.9", service={"Service": "redis", "ID": "redis-1", "Port": 6379},
    check={"CheckID": "redis-ok", "ServiceID": "redis-1", "Status": "passing", "Name": "redis"},
) is True
_, nodes = c.health.service("redis", passing=True)
assert len(nodes) == 1 and nodes[0]["Node"]["Address"] == "10.0.0.9", nodes
assert c.catalog.deregister("ext-1") is True
_, nodes = c.health.service("redis")
assert nodes == []

step("Connect CA roots and leaf")
roots = c.agent.connect.ca.roots()
assert roots["TrustDomain"].endswith(".consul") and roots["Roots"][0]["Active"], roots
leaf = c.agent.connect.ca.leaf("web")
assert leaf["ServiceURI"] == f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web", leaf

print("py-consul conformance: OK")
sys.exit(0)

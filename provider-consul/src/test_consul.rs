//! A minimal in-memory Consul for the provider's unit tests: catalog, health (blocking, with
//! per-service indexes), health state feeds and Connect CA endpoints. The end-to-end tests use
//! the dev catalog of the integration crate instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;

use crate::test_stub::{Reply, Request, Stub};

#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub node: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub status: String,
    pub weights: (i64, i64),
    pub maintenance: bool,
    pub no_check: bool,
}

impl Instance {
    pub fn new(id: &str, port: u16, tags: &[&str]) -> Instance {
        Instance {
            id: id.into(),
            node: "node1".into(),
            address: "127.0.0.1".into(),
            port,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            status: "passing".into(),
            weights: (1, 1),
            maintenance: false,
            no_check: false,
        }
    }
}

#[derive(Default)]
struct State {
    index: u64,
    services_index: u64,
    checks_index: u64,
    services: BTreeMap<String, (u64, Vec<Instance>)>,
    /// Forced answer status (e.g. 500) for every request when set.
    fail: Option<u16>,
    /// Added to every index returned (negative = indexes go backwards).
    index_offset: i64,
    roots: Option<(u64, String)>,
    leaf: Option<(u64, String)>,
}

#[derive(Clone)]
pub struct FakeConsul {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    pub stub: Arc<Stub>,
}

#[allow(dead_code)] // helpers used by some tests only
impl FakeConsul {
    pub async fn start() -> FakeConsul {
        let state = Arc::new(Mutex::new(State {
            index: 10,
            services_index: 10,
            checks_index: 10,
            ..Default::default()
        }));
        let changed = Arc::new(Notify::new());
        let (s2, c2) = (state.clone(), changed.clone());
        let stub = Stub::start_async(move |req| {
            let (s, c) = (s2.clone(), c2.clone());
            async move { answer(&s, &c, req).await }
        })
        .await;
        FakeConsul {
            state,
            changed,
            stub: Arc::new(stub),
        }
    }

    pub fn addr(&self) -> String {
        self.stub.addr().to_string()
    }

    fn edit(&self, service: &str, registration: bool, f: impl FnOnce(&mut Vec<Instance>)) {
        {
            let mut st = self.state.lock().unwrap();
            st.index += 1;
            let i = st.index;
            if registration {
                st.services_index = i;
            }
            st.checks_index = i;
            let e = st.services.entry(service.to_owned()).or_default();
            e.0 = i;
            f(&mut e.1);
            if e.1.is_empty() {
                st.services.remove(service);
            }
        }
        self.changed.notify_waiters();
    }

    pub fn register(&self, service: &str, inst: Instance) {
        self.edit(service, true, |v| {
            v.retain(|i| i.id != inst.id);
            v.push(inst);
        });
    }

    pub fn deregister(&self, service: &str, id: &str) {
        self.edit(service, true, |v| v.retain(|i| i.id != id));
    }

    pub fn set_status(&self, service: &str, id: &str, status: &str) {
        self.edit(service, false, |v| {
            for i in v.iter_mut().filter(|i| i.id == id) {
                i.status = status.into();
            }
        });
    }

    pub fn set_maintenance(&self, service: &str, id: &str, on: bool) {
        self.edit(service, false, |v| {
            for i in v.iter_mut().filter(|i| i.id == id) {
                i.maintenance = on;
            }
        });
    }

    pub fn set_fail(&self, status: Option<u16>) {
        self.state.lock().unwrap().fail = status;
        self.changed.notify_waiters();
    }

    pub fn set_index_offset(&self, off: i64) {
        self.state.lock().unwrap().index_offset = off;
        self.changed.notify_waiters();
    }

    pub fn set_roots(&self, json: String) {
        {
            let mut st = self.state.lock().unwrap();
            st.index += 1;
            st.roots = Some((st.index, json));
        }
        self.changed.notify_waiters();
    }

    pub fn set_leaf(&self, json: String) {
        {
            let mut st = self.state.lock().unwrap();
            st.index += 1;
            st.leaf = Some((st.index, json));
        }
        self.changed.notify_waiters();
    }

    pub fn requests(&self, path: &str) -> usize {
        self.stub.count(path)
    }
}

fn entry_json(name: &str, i: &Instance) -> serde_json::Value {
    let mut checks = vec![];
    if !i.no_check {
        checks.push(json!({
            "Node": i.node, "CheckID": format!("service:{}", i.id), "Status": i.status,
            "ServiceID": i.id, "ServiceName": name
        }));
    }
    if i.maintenance {
        checks.push(json!({
            "Node": i.node, "CheckID": format!("_service_maintenance:{}", i.id),
            "Status": "critical", "ServiceID": i.id, "ServiceName": name
        }));
    }
    json!({
        "Node": {"ID": "n", "Node": i.node, "Address": "127.0.0.9", "Datacenter": "dc1"},
        "Service": {"ID": i.id, "Service": name, "Tags": i.tags, "Address": i.address,
                    "Port": i.port, "Weights": {"Passing": i.weights.0, "Warning": i.weights.1}},
        "Checks": checks
    })
}

async fn answer(state: &Mutex<State>, changed: &Notify, req: Request) -> Reply {
    let wait = req
        .param("wait")
        .and_then(|w| w.strip_suffix("ms"))
        .and_then(|w| w.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(300));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = changed.notified();
        let (index, body) = {
            let st = state.lock().unwrap();
            if let Some(code) = st.fail {
                return Reply::json(code, "injected failure");
            }
            let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
            let (index, body) = match parts.as_slice() {
                ["v1", "catalog", "services"] => {
                    let m: BTreeMap<&String, Vec<String>> = st
                        .services
                        .iter()
                        .map(|(name, (_, insts))| {
                            let mut tags: Vec<String> =
                                insts.iter().flat_map(|i| i.tags.clone()).collect();
                            tags.sort();
                            tags.dedup();
                            (name, tags)
                        })
                        .collect();
                    (st.services_index, json!(m))
                }
                ["v1", "health", "service" | "connect", name] => {
                    let (idx, insts) = st
                        .services
                        .get(*name)
                        .cloned()
                        .unwrap_or((st.index, vec![]));
                    let v: Vec<_> = insts.iter().map(|i| entry_json(name, i)).collect();
                    (idx, json!(v))
                }
                ["v1", "health", "state", s] => {
                    let mut v = Vec::new();
                    for (name, (_, insts)) in &st.services {
                        for i in insts {
                            let e = entry_json(name, i);
                            for c in e["Checks"].as_array().unwrap() {
                                if *s == "any" || c["Status"] == *s {
                                    v.push(c.clone());
                                }
                            }
                        }
                    }
                    (st.checks_index, json!(v))
                }
                ["v1", "agent", "connect", "ca", "roots"] => match &st.roots {
                    Some((i, j)) => (*i, serde_json::from_str(j).unwrap()),
                    None => return Reply::json(500, "CA not initialized"),
                },
                ["v1", "agent", "connect", "ca", "leaf", _] => match &st.leaf {
                    Some((i, j)) => (*i, serde_json::from_str(j).unwrap()),
                    None => return Reply::json(500, "CA not initialized"),
                },
                _ => return Reply::json(404, "not found"),
            };
            let shown = (index as i64 + st.index_offset).max(1) as u64;
            (shown, body)
        };
        let want = req.index();
        if want == 0 || index > want || index < want {
            // Real Consul answers at once when the index moved either way.
            return Reply::json(200, &body.to_string()).with_index(index);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Reply::json(200, &body.to_string()).with_index(index);
        }
    }
}

//! ACLs: a management token and optional limited tokens, enforced as Consul answers.
//!
//! With ACLs on (a management token was configured), a token that is not known gets
//! `403 ACL not found`; a known token (or no token: the anonymous token) that lacks a permission
//! gets `403 Permission denied: token with AccessorID '…' lacks permission '…' on "…"`, except
//! that list reads filter out what the token may not see, as Consul does (for the anonymous token
//! only when [`AnonymousReads::Filter`] is chosen; by default anonymous reads are refused).

use std::collections::HashMap;
use std::sync::RwLock;

use super::util::uuid_v4;

/// The AccessorID Consul gives the anonymous token.
pub(crate) const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";

/// What a token may do. Prefix rules match like Consul's `service_prefix "<p>"` (an empty
/// prefix matches every service).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    management: bool,
    service_read: Vec<String>,
    service_write: Vec<String>,
    node_read: bool,
    node_write: bool,
    agent_read: bool,
    agent_write: bool,
}

impl TokenPolicy {
    /// No permission at all (add some with the other methods).
    pub fn none() -> Self {
        TokenPolicy::default()
    }

    /// Everything, like Consul's global-management policy.
    pub fn management() -> Self {
        TokenPolicy {
            management: true,
            ..TokenPolicy::default()
        }
    }

    /// `service_prefix "" { policy = "read" }`, `node_prefix "" { policy = "read" }` and
    /// `agent_prefix "" { policy = "read" }`: what a catalog watcher such as tagway needs,
    /// without `service:write` (so no Connect leaf).
    pub fn read_only() -> Self {
        TokenPolicy::none()
            .service_read("")
            .node_read()
            .agent_read()
    }

    /// Adds `service_prefix "<prefix>" { policy = "read" }`.
    pub fn service_read(mut self, prefix: impl Into<String>) -> Self {
        self.service_read.push(prefix.into());
        self
    }

    /// Adds `service_prefix "<prefix>" { policy = "write" }` (write implies read).
    pub fn service_write(mut self, prefix: impl Into<String>) -> Self {
        self.service_write.push(prefix.into());
        self
    }

    /// Adds `node_prefix "" { policy = "read" }`.
    pub fn node_read(mut self) -> Self {
        self.node_read = true;
        self
    }

    /// Adds `node_prefix "" { policy = "write" }`.
    pub fn node_write(mut self) -> Self {
        self.node_write = true;
        self
    }

    /// Adds `agent_prefix "" { policy = "read" }`.
    pub fn agent_read(mut self) -> Self {
        self.agent_read = true;
        self
    }

    /// Adds `agent_prefix "" { policy = "write" }`.
    pub fn agent_write(mut self) -> Self {
        self.agent_write = true;
        self
    }

    fn allows(&self, perm: &Perm<'_>) -> bool {
        if self.management {
            return true;
        }
        let any_prefix = |list: &[String], name: &str| list.iter().any(|p| name.starts_with(p));
        match perm {
            Perm::ServiceRead(name) => {
                any_prefix(&self.service_read, name) || any_prefix(&self.service_write, name)
            }
            Perm::ServiceWrite(name) => any_prefix(&self.service_write, name),
            Perm::NodeRead(_) => self.node_read || self.node_write,
            Perm::NodeWrite(_) => self.node_write,
            Perm::AgentRead => self.agent_read || self.agent_write,
        }
    }
}

/// How requests without a token (the anonymous token) are treated on reads when ACLs are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AnonymousReads {
    /// `403 Permission denied` on every read that needs a permission (the default).
    #[default]
    Deny,
    /// Consul's exact behaviour with `default_policy = "deny"`: list reads return 200 with the
    /// entries filtered out and `X-Consul-Results-Filtered-By-ACLs: true`.
    Filter,
}

/// A permission an endpoint needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Perm<'a> {
    ServiceRead(&'a str),
    ServiceWrite(&'a str),
    NodeRead(&'a str),
    NodeWrite(&'a str),
    AgentRead,
}

impl Perm<'_> {
    fn describe(&self) -> (&'static str, String) {
        match self {
            Perm::ServiceRead(n) => ("service:read", (*n).to_owned()),
            Perm::ServiceWrite(n) => ("service:write", (*n).to_owned()),
            Perm::NodeRead(n) => ("node:read", (*n).to_owned()),
            Perm::NodeWrite(n) => ("node:write", (*n).to_owned()),
            Perm::AgentRead => ("agent:read", String::new()),
        }
    }
}

/// Why a request was refused (becomes a 403).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AclDenied {
    /// The token is not known.
    NotFound,
    /// The token lacks the permission.
    Permission(String),
}

impl AclDenied {
    pub(crate) fn body(&self) -> String {
        match self {
            AclDenied::NotFound => "ACL not found".to_owned(),
            AclDenied::Permission(msg) => msg.clone(),
        }
    }
}

struct TokenEntry {
    accessor: String,
    policy: TokenPolicy,
}

/// The ACL system of one dev catalog.
pub(crate) struct Acl {
    enabled: bool,
    anonymous: AnonymousReads,
    tokens: RwLock<HashMap<String, TokenEntry>>,
}

/// The resolved identity of a request.
#[derive(Clone, Debug)]
pub(crate) struct Authorizer {
    /// None: ACLs disabled, everything allowed.
    policy: Option<TokenPolicy>,
    accessor: String,
    anonymous: bool,
    anonymous_reads: AnonymousReads,
}

impl Acl {
    pub(crate) fn new(
        management_token: Option<String>,
        extra: Vec<(String, TokenPolicy)>,
        anonymous: AnonymousReads,
    ) -> Self {
        let mut tokens = HashMap::new();
        let enabled = management_token.is_some();
        if let Some(t) = management_token {
            tokens.insert(
                t,
                TokenEntry {
                    accessor: uuid_v4(),
                    policy: TokenPolicy::management(),
                },
            );
        }
        for (secret, policy) in extra {
            tokens.insert(
                secret,
                TokenEntry {
                    accessor: uuid_v4(),
                    policy,
                },
            );
        }
        Acl {
            enabled,
            anonymous,
            tokens: RwLock::new(tokens),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn set_token(&self, secret: String, policy: TokenPolicy) {
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        let accessor = tokens
            .get(&secret)
            .map(|e| e.accessor.clone())
            .unwrap_or_else(uuid_v4);
        tokens.insert(secret, TokenEntry { accessor, policy });
    }

    pub(crate) fn remove_token(&self, secret: &str) -> bool {
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        tokens.remove(secret).is_some()
    }

    /// Resolves a token secret (None or empty: anonymous).
    pub(crate) fn resolve(&self, token: Option<&str>) -> Result<Authorizer, AclDenied> {
        if !self.enabled {
            return Ok(Authorizer {
                policy: None,
                accessor: String::new(),
                anonymous: false,
                anonymous_reads: self.anonymous,
            });
        }
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Authorizer {
                policy: Some(TokenPolicy::none()),
                accessor: ANONYMOUS_ACCESSOR.to_owned(),
                anonymous: true,
                anonymous_reads: self.anonymous,
            }),
            Some(secret) => {
                let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
                let entry = tokens.get(secret).ok_or(AclDenied::NotFound)?;
                Ok(Authorizer {
                    policy: Some(entry.policy.clone()),
                    accessor: entry.accessor.clone(),
                    anonymous: false,
                    anonymous_reads: self.anonymous,
                })
            }
        }
    }
}

impl Authorizer {
    /// Whether the permission is granted.
    pub(crate) fn can(&self, perm: Perm<'_>) -> bool {
        match &self.policy {
            None => true,
            Some(p) => p.allows(&perm),
        }
    }

    /// Ok, or the 403 Consul gives.
    pub(crate) fn require(&self, perm: Perm<'_>) -> Result<(), AclDenied> {
        if self.can(perm) {
            return Ok(());
        }
        let (name, resource) = perm.describe();
        let message = if resource.is_empty() {
            format!(
                "Permission denied: token with AccessorID '{}' lacks permission '{name}'",
                self.accessor
            )
        } else {
            format!(
                "Permission denied: token with AccessorID '{}' lacks permission '{name}' on {resource:?}",
                self.accessor
            )
        };
        Err(AclDenied::Permission(message))
    }

    /// For list reads: Ok(()) when the request may go on (entries are then filtered with
    /// [`Authorizer::can`]); an error when the anonymous token must be refused outright.
    pub(crate) fn require_list_read(&self, perm: Perm<'_>) -> Result<(), AclDenied> {
        if self.anonymous && self.anonymous_reads == AnonymousReads::Deny {
            return self.require(perm);
        }
        Ok(())
    }

    /// True when this identity sees everything (no filtering needed).
    pub(crate) fn sees_everything(&self) -> bool {
        match &self.policy {
            None => true,
            Some(p) => p.management,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_acls_allow_everything() {
        let acl = Acl::new(None, vec![], AnonymousReads::Deny);
        let a = acl.resolve(Some("whatever")).expect("resolves");
        assert!(a.can(Perm::ServiceWrite("web")));
        assert!(a.sees_everything());
    }

    #[test]
    fn unknown_token_is_acl_not_found() {
        let acl = Acl::new(Some("root".into()), vec![], AnonymousReads::Deny);
        let err = acl.resolve(Some("nope")).expect_err("unknown");
        assert_eq!(err.body(), "ACL not found");
    }

    #[test]
    fn anonymous_lacks_permissions_with_consul_message() {
        let acl = Acl::new(Some("root".into()), vec![], AnonymousReads::Deny);
        let anon = acl.resolve(None).expect("anonymous");
        let err = anon.require(Perm::ServiceWrite("web")).expect_err("denied");
        assert_eq!(
            err.body(),
            "Permission denied: token with AccessorID '00000000-0000-0000-0000-000000000002' lacks permission 'service:write' on \"web\""
        );
        assert!(anon.require_list_read(Perm::ServiceRead("")).is_err());
    }

    #[test]
    fn filter_mode_lets_anonymous_list_reads_through() {
        let acl = Acl::new(Some("root".into()), vec![], AnonymousReads::Filter);
        let anon = acl.resolve(Some("")).expect("anonymous");
        assert!(anon.require_list_read(Perm::ServiceRead("")).is_ok());
        assert!(!anon.can(Perm::ServiceRead("web")));
    }

    #[test]
    fn prefix_policies() {
        let acl = Acl::new(
            Some("root".into()),
            vec![(
                "t".into(),
                TokenPolicy::none()
                    .service_read("web")
                    .service_write("tagway"),
            )],
            AnonymousReads::Deny,
        );
        let a = acl.resolve(Some("t")).expect("known");
        assert!(a.can(Perm::ServiceRead("web-api")));
        assert!(!a.can(Perm::ServiceRead("db")));
        assert!(a.can(Perm::ServiceRead("tagway")));
        assert!(a.can(Perm::ServiceWrite("tagway")));
        assert!(!a.can(Perm::ServiceWrite("web")));
        assert!(!a.can(Perm::NodeRead("n")));
        let root = acl.resolve(Some("root")).expect("root");
        assert!(root.sees_everything());
        acl.remove_token("t");
        assert!(acl.resolve(Some("t")).is_err());
    }
}

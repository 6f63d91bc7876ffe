//! Who may do what, when the coordinator serves TLS.
//!
//! A caller is the identity its client certificate names (see
//! `tandem_runtime::tls`); nothing it sends says who it is. The contract:
//!
//! - A caller acts for its own service's transactions, check-back session
//!   and sagas (its service name is the identity's), and for the services
//!   a grant names in `transactions`; never for any other.
//! - It consumes with the group named as its service, or one a grant's
//!   `groups` names.
//! - Without an `[authorization]` table, any caller publishes to and
//!   consumes from every topic. With one, only the topics its grants name
//!   (`consume` on T also allows creating and publishing to T's `.dlq`,
//!   where its sidecar puts what it gives up).
//! - Operator calls (reading messages, listing transactions and sagas,
//!   moving offsets, growing or deleting topics) are for `admins` only;
//!   admins may do everything. Listing and describing topics and counters
//!   is open to every caller.
//! - A call marked as forwarded is accepted only from another replica
//!   (a certificate naming this replica's own identity): the first replica
//!   checked it.
//!
//! Patterns match a whole name; `*` stands for any run of characters.

use serde::Deserialize;
use tandem_runtime::tls::Identity;
use tonic::{Request, Status};

/// The `[authorization]` table of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRaw {
    /// Identities (service names or full ids, patterns) allowed every call.
    #[serde(default)]
    pub admins: Vec<String>,
    /// What callers may do, beyond their own service's transactions.
    #[serde(default)]
    pub grant: Vec<Grant>,
}

/// One `[[authorization.grant]]`: what the callers it names may do.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Identities (service names or full ids, patterns) it applies to.
    pub principals: Vec<String>,
    /// Topics they may publish to (and prepare transactional messages for).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topics they may consume.
    #[serde(default)]
    pub consume: Vec<String>,
    /// Consumer groups they may consume as, beyond their own service name.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Other services whose transactions, sessions and sagas they may act for.
    #[serde(default)]
    pub transactions: Vec<String>,
}

/// The checked rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    admins: Vec<String>,
    /// `None`: no `[authorization]` table (topics open to every caller).
    grants: Option<Vec<Grant>>,
}

impl Authorization {
    /// The rules of an `[authorization]` table, or the defaults without one.
    pub fn new(raw: Option<AuthorizationRaw>) -> Authorization {
        match raw {
            None => Authorization {
                admins: Vec::new(),
                grants: None,
            },
            Some(r) => Authorization {
                admins: r.admins,
                grants: Some(r.grant),
            },
        }
    }

    /// Whether rules beyond the defaults were given.
    pub fn configured(&self) -> bool {
        self.grants.is_some() || !self.admins.is_empty()
    }
}

/// Whether `pattern` matches all of `name` (`*`: any run of characters).
pub fn matches(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut name) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        match name.find(part) {
            Some(at) => name = &name[at + part.len()..],
            None => return false,
        }
    }
    name.len() >= last.len() && name.ends_with(last)
}

fn names(patterns: &[String], who: &Identity) -> bool {
    patterns
        .iter()
        .any(|p| matches(p, &who.name) || matches(p, &who.id))
}

fn any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| matches(p, name))
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No TLS, or a call this process made to itself: not checked.
    Unchecked,
    /// Another replica, forwarding a call it checked.
    Replica,
    /// A client with a certificate.
    Client(Identity),
}

/// What a call does.
#[derive(Clone, Copy, Debug)]
pub enum Action<'a> {
    /// Read topic names, descriptions, counters.
    Describe,
    /// Create a topic.
    Create(&'a str),
    /// Publish to a topic.
    Publish(&'a str),
    /// Consume a topic as a group.
    Consume {
        /// The topic.
        topic: &'a str,
        /// The group.
        group: &'a str,
    },
    /// Act for a service: its transactions, session, sagas.
    ActFor(&'a str),
    /// An operator call.
    Operate(&'static str),
}

fn denied(who: &Identity, what: String) -> Status {
    Status::permission_denied(format!("{who} may not {what}"))
}

impl Authorization {
    /// Allows `action` to `caller`, or says why not (PERMISSION_DENIED).
    pub fn allow(&self, caller: &Caller, action: Action<'_>) -> Result<(), Status> {
        let who = match caller {
            Caller::Unchecked | Caller::Replica => return Ok(()),
            Caller::Client(who) => who,
        };
        if names(&self.admins, who) {
            return Ok(());
        }
        let grants = || {
            self.grants
                .iter()
                .flatten()
                .filter(|g| names(&g.principals, who))
        };
        let open = self.grants.is_none();
        let ok = match action {
            Action::Describe => true,
            Action::Publish(topic) => {
                open || grants().any(|g| {
                    any(&g.publish, topic)
                        || topic
                            .strip_suffix(".dlq")
                            .is_some_and(|t| any(&g.consume, t))
                })
            }
            Action::Create(topic) => {
                open || grants().any(|g| {
                    any(&g.publish, topic)
                        || topic
                            .strip_suffix(".dlq")
                            .is_some_and(|t| any(&g.consume, t))
                })
            }
            Action::Consume { topic, group } => {
                let topic_ok = open || grants().any(|g| any(&g.consume, topic));
                if !topic_ok {
                    return Err(denied(who, format!("consume topic {topic:?}")));
                }
                group == who.name || grants().any(|g| any(&g.groups, group))
            }
            Action::ActFor(service) => {
                service == who.name || grants().any(|g| any(&g.transactions, service))
            }
            Action::Operate(_) => false,
        };
        if ok {
            return Ok(());
        }
        Err(denied(
            who,
            match action {
                Action::Describe => unreachable!("open to every caller"),
                Action::Create(t) => format!("create topic {t:?}"),
                Action::Publish(t) => format!("publish to topic {t:?}"),
                Action::Consume { group, .. } => format!(
                    "consume as group {group:?} (its own group is {:?}; grant others with groups = [...])",
                    who.name
                ),
                Action::ActFor(s) => format!("act for service {s:?}'s transactions"),
                Action::Operate(call) => format!(
                    "call {call}: operator calls are for the identities in [authorization] admins"
                ),
            },
        ))
    }
}

/// Who sent `req`: `tls` is whether this coordinator serves TLS, `replica`
/// its own identity, and `forwarded` whether the call says it was sent on
/// by another replica.
pub fn caller<T>(
    req: &Request<T>,
    tls: Option<&Identity>,
    forwarded: bool,
) -> Result<Caller, Status> {
    let Some(me) = tls else {
        return Ok(Caller::Unchecked);
    };
    if !tandem_runtime::tls::over_tls(req) {
        // Every connection a TLS server accepts carries its peer: a
        // request without one was made inside this process.
        return Ok(Caller::Unchecked);
    }
    let Some(who) = tandem_runtime::tls::peer_identity(req) else {
        return Err(Status::unauthenticated(
            "the client certificate names no identity (a URI or DNS SAN)",
        ));
    };
    if forwarded {
        if who.id == me.id {
            return Ok(Caller::Replica);
        }
        return Err(denied(
            who,
            "send forwarded calls: only coordinator replicas do".to_owned(),
        ));
    }
    Ok(Caller::Client(who.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Caller {
        Caller::Client(Identity {
            id: format!("spiffe://test/ns/shop/sa/{name}"),
            name: name.to_owned(),
        })
    }

    #[test]
    fn patterns_match_whole_names() {
        for (p, n, want) in [
            ("orders", "orders", true),
            ("orders", "orders2", false),
            ("orders.*", "orders.created", true),
            ("orders.*", "orders", false),
            ("*", "", true),
            ("*.dlq", "a.dlq", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*a", "a", false),
            (
                "spiffe://test/*/sa/orders",
                "spiffe://test/ns/shop/sa/orders",
                true,
            ),
        ] {
            assert_eq!(matches(p, n), want, "{p} ~ {n}");
        }
    }

    #[test]
    fn a_caller_acts_only_for_its_own_service_by_default() {
        let a = Authorization::new(None);
        assert!(a.allow(&id("orders"), Action::ActFor("orders")).is_ok());
        let e = a.allow(&id("payments"), Action::ActFor("orders"));
        assert_eq!(e.map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        assert!(
            a.allow(&id("payments"), Action::Publish("orders.created"))
                .is_ok()
        );
        assert!(
            a.allow(
                &id("payments"),
                Action::Consume {
                    topic: "t",
                    group: "payments"
                }
            )
            .is_ok()
        );
        assert!(
            a.allow(
                &id("payments"),
                Action::Consume {
                    topic: "t",
                    group: "orders"
                }
            )
            .is_err()
        );
        assert!(
            a.allow(&id("payments"), Action::Operate("DeleteTopic"))
                .is_err()
        );
        assert!(
            a.allow(&Caller::Replica, Action::Operate("DeleteTopic"))
                .is_ok()
        );
    }

    #[test]
    fn grants_open_what_they_name_and_nothing_else() {
        let a = Authorization::new(Some(AuthorizationRaw {
            admins: vec!["tandem-admin".into()],
            grant: vec![
                Grant {
                    principals: vec!["orders".into()],
                    publish: vec!["orders.*".into()],
                    ..Grant::default()
                },
                Grant {
                    principals: vec!["payments".into()],
                    consume: vec!["orders.*".into()],
                    transactions: vec!["billing".into()],
                    groups: vec!["payments-*".into()],
                    ..Grant::default()
                },
            ],
        }));
        assert!(
            a.allow(&id("orders"), Action::Publish("orders.created"))
                .is_ok()
        );
        assert!(
            a.allow(&id("orders"), Action::Publish("payments.done"))
                .is_err()
        );
        assert!(
            a.allow(
                &id("orders"),
                Action::Consume {
                    topic: "orders.created",
                    group: "orders"
                }
            )
            .is_err()
        );
        let c = |topic, group| a.allow(&id("payments"), Action::Consume { topic, group });
        assert!(c("orders.created", "payments").is_ok());
        assert!(c("orders.created", "payments-audit").is_ok());
        assert!(c("orders.created", "orders").is_err());
        assert!(c("carts", "payments").is_err());
        assert!(
            a.allow(&id("payments"), Action::Create("orders.created.dlq"))
                .is_ok()
        );
        assert!(
            a.allow(&id("payments"), Action::Publish("orders.created.dlq"))
                .is_ok()
        );
        assert!(
            a.allow(&id("payments"), Action::Publish("orders.created"))
                .is_err()
        );
        assert!(a.allow(&id("payments"), Action::ActFor("billing")).is_ok());
        assert!(a.allow(&id("payments"), Action::ActFor("orders")).is_err());
        assert!(
            a.allow(&id("tandem-admin"), Action::Operate("ResetOffsets"))
                .is_ok()
        );
        assert!(
            a.allow(&id("tandem-admin"), Action::ActFor("orders"))
                .is_ok()
        );
        let e = a
            .allow(&id("carts"), Action::Operate("ResetOffsets"))
            .err()
            .map(|s| s.message().to_owned());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("carts") && m.contains("admins")),
            "{e:?}"
        );
    }
}

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
//! - While there is no grant, any caller publishes to and consumes from
//!   every topic (but Tandem's own, `__*`, which are for admins). Then,
//!   only the topics its grants name
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
    /// Client identities must start with this (a trust domain and
    /// namespace, `spiffe://cluster.local/ns/shop/`): where the CA signs
    /// for more than Tandem's services, the others are turned away.
    #[serde(default)]
    pub identity_prefix: Option<String>,
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
    /// Services whose branches their sagas may call, beyond their own (once
    /// there is any grant; before, any).
    #[serde(default)]
    pub sagas: Vec<String>,
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
    /// Client identities must start with this (`spiffe://DOMAIN/ns/NS/`).
    pub identity_prefix: Option<String>,
}

impl Authorization {
    /// The rules of an `[authorization]` table, or the defaults without one.
    pub fn new(raw: Option<AuthorizationRaw>) -> Authorization {
        match raw {
            None => Authorization {
                admins: Vec::new(),
                grants: None,
                identity_prefix: None,
            },
            Some(r) => Authorization {
                admins: r.admins,
                grants: Some(r.grant),
                identity_prefix: r.identity_prefix.filter(|p| !p.is_empty()),
            },
        }
    }

    /// Whether topics are open to every caller: no grant at all.
    pub fn topics_open(&self) -> bool {
        self.grants.as_ref().is_none_or(Vec::is_empty)
    }

    /// Whether rules beyond the defaults were given.
    pub fn configured(&self) -> bool {
        self.grants.is_some() || !self.admins.is_empty() || self.identity_prefix.is_some()
    }
}

impl Authorization {
    /// The services a client's saga (of service `starter`, which the caller
    /// acts for) calls branches of: the caller's own, the saga's, those a
    /// grant's `sagas` names, or any while there is no grant.
    pub fn check_saga_branches<'a>(
        &self,
        caller: &Caller,
        starter: &str,
        services: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Status> {
        let Caller::Client(who) = caller else {
            return Ok(());
        };
        if names(&self.admins, who) || self.topics_open() {
            return Ok(());
        }
        for service in services {
            let granted = service == who.name
                || service == starter
                || self
                    .grants
                    .iter()
                    .flatten()
                    .filter(|g| names(&g.principals, who))
                    .any(|g| any(&g.sagas, service));
            if !granted {
                return Err(denied(
                    who,
                    format!(
                        "start a saga with a branch of service {service:?} (grant it with sagas = [...])"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// [`check_saga_branches`](Self::check_saga_branches) for a saga begun
    /// in a transaction: a half message for `__sagas` carrying the
    /// StartSagaRequest (one that does not decode is refused later, as
    /// INVALID_ARGUMENT).
    pub fn check_saga_start(
        &self,
        caller: &Caller,
        starter: &str,
        topic: &str,
        message: Option<&tandem_proto::coordinator::Message>,
    ) -> Result<(), Status> {
        use prost::Message as _;
        if topic != crate::saga::SAGA_TOPIC {
            return Ok(());
        }
        let Some(Ok(start)) =
            message.map(|m| tandem_proto::coordinator::StartSagaRequest::decode(m.value.as_ref()))
        else {
            return Ok(());
        };
        self.check_saga_branches(
            caller,
            starter,
            start
                .definition
                .iter()
                .flat_map(|d| &d.branches)
                .map(|b| b.service.as_str()),
        )
    }

    /// Dead letters a client (not an admin) publishes or prepares for
    /// `T.dlq` must say where they come from, as a sidecar's do: their last
    /// `tandem.topic` header (the one `tandem dlq redrive` reads; a sidecar
    /// appends its own after those the message already had) names T, and
    /// their last `tandem.group` header a group the caller consumes T as. `tandem dlq redrive` sends them back to T for that
    /// group: without this, a consumer of T could put any message in
    /// front of another group, under an admin's hand.
    pub fn check_dead_letters(
        &self,
        caller: &Caller,
        topic: &str,
        messages: &[tandem_proto::coordinator::Message],
    ) -> Result<(), Status> {
        let (Caller::Client(who), Some(origin)) = (caller, topic.strip_suffix(".dlq")) else {
            return Ok(());
        };
        if names(&self.admins, who) {
            return Ok(());
        }
        for (i, m) in messages.iter().enumerate() {
            let values = |name: &str| -> Vec<&[u8]> {
                m.headers
                    .iter()
                    .filter(|h| h.name == name)
                    .map(|h| h.value.as_ref())
                    .collect()
            };
            let (topics, groups) = (values("tandem.topic"), values("tandem.group"));
            let group = match (topics.last(), groups.last()) {
                (Some(t), Some(g)) if *t == origin.as_bytes() => std::str::from_utf8(g).ok(),
                _ => None,
            };
            let Some(group) = group else {
                return Err(Status::permission_denied(format!(
                    "messages[{i}]: a dead letter of {origin:?} carries, last, a tandem.topic header naming {origin:?} and a tandem.group header"
                )));
            };
            self.allow(
                caller,
                Action::Consume {
                    topic: origin,
                    group,
                },
            )
            .map_err(|s| {
                Status::permission_denied(format!(
                    "messages[{i}]: a dead letter for group {group:?}: {}",
                    s.message()
                ))
            })?;
        }
        Ok(())
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
    /// Prepare a transactional message for a topic (as publishing, but a
    /// saga begun in a transaction prepares to `__sagas`, which acting for
    /// the service allows).
    Prepare(&'a str),
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
        // (Topics are open while there is no grant at all.)
        let open = self.topics_open();
        let ok = match action {
            Action::Describe => true,
            Action::Prepare(crate::saga::SAGA_TOPIC) => true,
            // Tandem's own topics (`__sagas`: every service's saga
            // definitions) are for admins only, whatever a pattern says.
            Action::Publish(t) | Action::Prepare(t) | Action::Create(t) if t.starts_with("__") => {
                false
            }
            Action::Consume { topic, .. } if topic.starts_with("__") => {
                return Err(denied(who, format!("consume Tandem's own topic {topic:?}")));
            }
            // (Creating a topic takes the right to publish to it.)
            Action::Publish(topic) | Action::Prepare(topic) | Action::Create(topic) => {
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
                Action::Publish(t) | Action::Prepare(t) => format!("publish to topic {t:?}"),
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

/// Marks a request this process makes to its own service (a `Transact`
/// item served here): not checked again.
#[derive(Clone, Copy, Debug)]
pub struct InProcess;

/// Who sent `req`: `tls` is this replica's identity when it serves TLS,
/// `forwarded` whether the call says another replica sent it on, and
/// `prefix` what every client identity must start with, if anything.
pub fn caller<T>(
    req: &Request<T>,
    tls: Option<&Identity>,
    forwarded: bool,
    prefix: Option<&str>,
) -> Result<Caller, Status> {
    let Some(me) = tls else {
        return Ok(Caller::Unchecked);
    };
    if req.extensions().get::<InProcess>().is_some() {
        return Ok(Caller::Unchecked);
    }
    if !tandem_runtime::tls::over_tls(req) {
        // Every connection a TLS server accepts carries its peer.
        return Err(Status::unauthenticated(
            "the call came over no TLS connection",
        ));
    }
    let Some(who) = tandem_runtime::tls::peer_identity(req) else {
        return Err(Status::unauthenticated(
            "the client certificate names no identity (a URI or DNS SAN)",
        ));
    };
    if who.name == "default" {
        return Err(Status::unauthenticated(format!(
            "{who}: a default service account's certificate, which every pod without one of its own shares, names no service"
        )));
    }
    if let Some(p) = prefix
        && !who.id.starts_with(p)
    {
        return Err(Status::unauthenticated(format!(
            "{who}: the identities here start with {p}"
        )));
    }
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
    fn callers_are_their_certificates() {
        use tandem_runtime::tls::PeerInfo;
        let me = Identity {
            id: "spiffe://test/ns/shop/sa/tandem-coordinator".into(),
            name: "tandem-coordinator".into(),
        };
        let orders = Identity {
            id: "spiffe://test/ns/shop/sa/orders".into(),
            name: "orders".into(),
        };
        let from = |who: Option<&Identity>| {
            let mut r = Request::new(());
            r.extensions_mut().insert(PeerInfo {
                remote: None,
                identity: who.cloned(),
            });
            r
        };
        let code = |r: Result<Caller, Status>| r.err().map(|s| s.code());
        // Plaintext: nothing is checked.
        assert!(matches!(
            caller(&Request::new(()), None, true, None),
            Ok(Caller::Unchecked)
        ));
        // TLS: a request without its connection's peer is refused, unless
        // this process made it.
        assert_eq!(
            code(caller(&Request::new(()), Some(&me), false, None)),
            Some(tonic::Code::Unauthenticated)
        );
        let mut inside = Request::new(());
        inside.extensions_mut().insert(InProcess);
        assert!(matches!(
            caller(&inside, Some(&me), true, None),
            Ok(Caller::Unchecked)
        ));
        assert_eq!(
            code(caller(&from(None), Some(&me), false, None)),
            Some(tonic::Code::Unauthenticated)
        );
        assert!(matches!(
            caller(&from(Some(&orders)), Some(&me), false, None),
            Ok(Caller::Client(ref i)) if *i == orders
        ));
        // Forwarded: only from a certificate naming this replica's identity.
        assert_eq!(
            code(caller(&from(Some(&orders)), Some(&me), true, None)),
            Some(tonic::Code::PermissionDenied)
        );
        assert!(matches!(
            caller(&from(Some(&me)), Some(&me), true, None),
            Ok(Caller::Replica)
        ));
        // An identity outside the prefix is nobody here.
        assert_eq!(
            code(caller(
                &from(Some(&orders)),
                Some(&me),
                false,
                Some("spiffe://test/ns/other/")
            )),
            Some(tonic::Code::Unauthenticated)
        );
        assert!(
            caller(
                &from(Some(&orders)),
                Some(&me),
                false,
                Some("spiffe://test/ns/shop/")
            )
            .is_ok()
        );
    }

    #[test]
    fn topics_stay_open_until_a_grant_names_any() {
        let admins_only = Authorization::new(Some(AuthorizationRaw {
            admins: vec!["tandem-admin".into()],
            ..AuthorizationRaw::default()
        }));
        assert!(
            admins_only
                .allow(&id("orders"), Action::Publish("orders.created"))
                .is_ok()
        );
        assert!(
            admins_only
                .allow(&id("orders"), Action::Operate("ReadMessages"))
                .is_err()
        );
        let granted = Authorization::new(Some(AuthorizationRaw {
            grant: vec![Grant {
                principals: vec!["orders".into()],
                publish: vec!["orders.*".into()],
                ..Grant::default()
            }],
            ..AuthorizationRaw::default()
        }));
        // A saga begun in a transaction prepares to __sagas: acting for the
        // service is enough; publishing there directly is not allowed.
        assert!(
            granted
                .allow(&id("orders"), Action::Prepare(crate::saga::SAGA_TOPIC))
                .is_ok()
        );
        assert!(
            granted
                .allow(&id("orders"), Action::Publish(crate::saga::SAGA_TOPIC))
                .is_err()
        );
        assert!(
            granted
                .allow(&id("orders"), Action::Prepare("payments"))
                .is_err()
        );
    }

    #[test]
    fn sagas_call_the_branches_of_granted_services() {
        let a = Authorization::new(Some(AuthorizationRaw {
            grant: vec![Grant {
                principals: vec!["orders".into()],
                sagas: vec!["cart".into()],
                ..Grant::default()
            }],
            ..AuthorizationRaw::default()
        }));
        assert!(
            a.check_saga_branches(&id("orders"), "orders", ["orders", "cart"])
                .is_ok()
        );
        let e = a.check_saga_branches(&id("orders"), "orders", ["orders", "payments"]);
        assert_eq!(e.map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        assert!(
            a.check_saga_branches(&id("cart"), "cart", ["orders"])
                .is_err()
        );
        // The saga's own service, which the caller acts for, is its own.
        assert!(
            a.check_saga_branches(&id("cart"), "billing", ["billing"])
                .is_ok()
        );
        // While there is no grant, any.
        let open = Authorization::new(None);
        assert!(
            open.check_saga_branches(&id("orders"), "orders", ["payments"])
                .is_ok()
        );
    }

    #[test]
    fn dead_letters_name_a_group_the_caller_consumes_as() {
        use bytes::Bytes;
        use tandem_proto::coordinator as pb;
        let a = Authorization::new(Some(AuthorizationRaw {
            admins: vec!["tandem-admin".into()],
            grant: vec![Grant {
                principals: vec!["payments".into()],
                consume: vec!["orders".into()],
                ..Grant::default()
            }],
            ..AuthorizationRaw::default()
        }));
        let letter = |topic: &str, group: &str| pb::Message {
            headers: vec![
                pb::Header {
                    name: "tandem.topic".into(),
                    value: Bytes::from(topic.to_owned()),
                },
                pb::Header {
                    name: "tandem.group".into(),
                    value: Bytes::from(group.to_owned()),
                },
            ],
            ..Default::default()
        };
        let check = |who: &str, m: pb::Message| a.check_dead_letters(&id(who), "orders.dlq", &[m]);
        assert!(check("payments", letter("orders", "payments")).is_ok());
        // Another group's, another topic's, or none at all: refused.
        assert!(check("payments", letter("orders", "cart")).is_err());
        assert!(check("payments", letter("carts", "payments")).is_err());
        assert!(check("payments", pb::Message::default()).is_err());
        // The last of each header counts, as redrive reads it: a message
        // that carried the headers before its sidecar added its own.
        let mut twice = letter("orders.x", "cart");
        twice.headers.extend(letter("orders", "payments").headers);
        assert!(check("payments", twice.clone()).is_ok());
        twice.headers.extend(letter("orders", "cart").headers);
        assert!(check("payments", twice).is_err());
        // Admins, and topics that are no dead-letter topics, are not checked.
        assert!(check("tandem-admin", pb::Message::default()).is_ok());
        assert!(
            a.check_dead_letters(&id("payments"), "orders", &[pb::Message::default()])
                .is_ok()
        );
    }

    #[test]
    fn tandem_s_own_topics_are_for_admins() {
        let open = Authorization::new(Some(AuthorizationRaw {
            admins: vec!["tandem-admin".into()],
            ..AuthorizationRaw::default()
        }));
        let everything = Authorization::new(Some(AuthorizationRaw {
            grant: vec![Grant {
                principals: vec!["*".into()],
                publish: vec!["*".into()],
                consume: vec!["*".into()],
                ..Grant::default()
            }],
            ..AuthorizationRaw::default()
        }));
        for a in [&open, &everything] {
            let consume = Action::Consume {
                topic: "__sagas",
                group: "orders",
            };
            assert!(a.allow(&id("orders"), consume).is_err());
            assert!(a.allow(&id("orders"), Action::Publish("__sagas")).is_err());
            assert!(a.allow(&id("orders"), Action::Create("__x")).is_err());
            assert!(a.allow(&id("orders"), Action::Publish("orders")).is_ok());
        }
        assert!(
            open.allow(
                &id("tandem-admin"),
                Action::Consume {
                    topic: "__sagas",
                    group: "x"
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn grants_open_what_they_name_and_nothing_else() {
        let a = Authorization::new(Some(AuthorizationRaw {
            admins: vec!["tandem-admin".into()],
            identity_prefix: None,
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

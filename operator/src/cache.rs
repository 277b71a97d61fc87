//! What the operator knows of its children without asking the API server: reflector stores
//! filled by the controller's own watches (labelled `app.kubernetes.io/managed-by`), and the
//! test that decides whether an apply would change anything.
//!
//! A reconcile compares each child it would apply with the store's copy and skips the call when
//! the copy already holds every field of the apply body ([`holds`]), the `tandem.dev/applied`
//! annotation included: a hash of the body ([`stamp`]), so a field the operator stopped setting
//! (a label, a limit) still changes the body and is applied, while drift of a field it sets
//! (someone scaled a StatefulSet by hand) fails the field comparison and is applied over. A
//! converged reconcile thus makes no API call for its children. Until a store has its first
//! list, [`Lookup::Unknown`] sends the reconcile the old way: apply everything, read before
//! pruning.

use std::sync::{Arc, Mutex};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::Resource;
use serde::Serialize;
use serde_json::Value;

/// Annotation that carries the hash of the apply body a child was last applied with.
pub const APPLIED_ANNOTATION: &str = "tandem.dev/applied";

/// One store per child kind.
#[derive(Clone)]
pub struct ChildCache {
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
}

/// The writing ends of [`ChildCache`]: the controller's watches feed them ([`crate::controller::run`]).
pub struct ChildWriters {
    pub service_accounts: reflector::store::Writer<ServiceAccount>,
    pub roles: reflector::store::Writer<Role>,
    pub role_bindings: reflector::store::Writer<RoleBinding>,
    pub services: reflector::store::Writer<Service>,
    pub deployments: reflector::store::Writer<Deployment>,
    pub statefulsets: reflector::store::Writer<StatefulSet>,
    pub disruption_budgets: reflector::store::Writer<PodDisruptionBudget>,
}

/// A cache with its writers; the writers are taken once, by whoever runs the watches. A cache
/// whose writers nobody drives stays [`Lookup::Unknown`] (unit tests).
pub fn new() -> (ChildCache, Mutex<Option<ChildWriters>>) {
    let (service_accounts, sa_w) = reflector::store();
    let (roles, role_w) = reflector::store();
    let (role_bindings, rb_w) = reflector::store();
    let (services, svc_w) = reflector::store();
    let (deployments, dep_w) = reflector::store();
    let (statefulsets, sts_w) = reflector::store();
    let (disruption_budgets, pdb_w) = reflector::store();
    (
        ChildCache {
            service_accounts,
            roles,
            role_bindings,
            services,
            deployments,
            statefulsets,
            disruption_budgets,
        },
        Mutex::new(Some(ChildWriters {
            service_accounts: sa_w,
            roles: role_w,
            role_bindings: rb_w,
            services: svc_w,
            deployments: dep_w,
            statefulsets: sts_w,
            disruption_budgets: pdb_w,
        })),
    )
}

/// A child kind with a store in [`ChildCache`].
pub trait Cached: Resource<DynamicType = ()> + Clone + 'static {
    fn store(cache: &ChildCache) -> &Store<Self>;
}

macro_rules! cached {
    ($kind:ty, $field:ident) => {
        impl Cached for $kind {
            fn store(cache: &ChildCache) -> &Store<Self> {
                &cache.$field
            }
        }
    };
}
cached!(ServiceAccount, service_accounts);
cached!(Role, roles);
cached!(RoleBinding, role_bindings);
cached!(Service, services);
cached!(Deployment, deployments);
cached!(StatefulSet, statefulsets);
cached!(PodDisruptionBudget, disruption_budgets);

/// What the store knows of one object.
#[derive(Debug)]
pub enum Lookup<K> {
    /// The store has not had its first list yet: ask the API server.
    Unknown,
    Absent,
    Present(Arc<K>),
}

impl ChildCache {
    pub fn lookup<K: Cached>(&self, ns: &str, name: &str) -> Lookup<K> {
        let store = K::store(self);
        if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
            return Lookup::Unknown;
        }
        match store.get(&ObjectRef::new(name).within(ns)) {
            Some(obj) => Lookup::Present(obj),
            None => Lookup::Absent,
        }
    }
}

/// 64-bit FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `obj` as it is applied: with [`APPLIED_ANNOTATION`] set to the hash of its body without it.
pub fn stamp<K: Resource + Serialize + Clone>(obj: &K) -> K {
    let body = serde_json::to_vec(obj).expect("a child always serializes");
    let mut stamped = obj.clone();
    stamped
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_ANNOTATION.into(), format!("{:016x}", fnv1a(&body)));
    stamped
}

/// Whether `have` (an object as the API server keeps it) already holds every field of `want`
/// (an apply body), so that applying `want` would change nothing the operator manages. Maps:
/// every key of `want` with a value `have` holds; lists: the same length, element by element;
/// an empty map or list in `want` matches an absent field. Anything else must be equal.
pub fn holds(have: &Value, want: &Value) -> bool {
    first_difference(have, want).is_none()
}

/// Where `have` first fails to hold `want` ([`holds`]), as a path like
/// `.spec.template.spec.containers[0].env[2].value`; `None` when it holds all of it.
pub fn first_difference(have: &Value, want: &Value) -> Option<String> {
    match (have, want) {
        (Value::Object(have), Value::Object(want)) => want.iter().find_map(|(k, w)| {
            let inner = match have.get(k) {
                Some(h) => first_difference(h, w),
                None => (!is_empty(w)).then(String::new),
            };
            inner.map(|rest| format!(".{k}{rest}"))
        }),
        (Value::Array(have), Value::Array(want)) => {
            if have.len() != want.len() {
                return Some(format!(" (length {} vs {})", have.len(), want.len()));
            }
            have.iter()
                .zip(want)
                .enumerate()
                .find_map(|(i, (h, w))| first_difference(h, w).map(|rest| format!("[{i}]{rest}")))
        }
        (Value::Null, w) => (!is_empty(w)).then(String::new),
        (h, w) => (h != w).then(|| format!(" ({h} vs {w})")),
    }
}

/// Whether an absent field says the same as `v`: the API server stores most fields with Go's
/// `omitempty`, so an empty string, `false` or 0 in an apply body comes back as no field at all
/// (a field it defaults to something else comes back with that value, not absent).
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn holds_ignores_server_defaults_but_not_changed_or_dropped_values() {
        let want = json!({"spec": {"replicas": 2, "ports": [{"name": "http", "port": 8000}],
            "selector": {"a": "b"}, "volumes": []}});
        let server = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "selector": {"a": "b"}}, "status": {"replicas": 2}});
        assert!(holds(&server, &want));

        let mut scaled = server.clone();
        scaled["spec"]["replicas"] = json!(3);
        assert!(!holds(&scaled, &want), "drift of a managed field");
        let mut extra_port = server.clone();
        extra_port["spec"]["ports"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "x", "port": 1}));
        assert!(!holds(&extra_port, &want), "a list element the body lacks");
        let mut missing = server;
        missing["spec"].as_object_mut().unwrap().remove("selector");
        assert!(!holds(&missing, &want), "a field the body sets is absent");

        // Zero values the server drops (omitempty) still match; non-zero ones do not.
        let env = json!({"env": [{"name": "A", "value": ""}, {"name": "B", "value": "1"}],
            "hostNetwork": false, "port": 0});
        let stored = json!({"env": [{"name": "A"}, {"name": "B", "value": "1"}]});
        assert!(holds(&stored, &env));
        let dropped = json!({"env": [{"name": "A"}, {"name": "B"}]});
        assert!(!holds(&dropped, &env), "a non-empty value the server lacks");
        assert!(!holds(&json!({}), &json!({"hostNetwork": true})));
        assert!(!holds(&json!({}), &json!({"port": 8000})));
        assert_eq!(
            first_difference(&dropped, &env).as_deref(),
            Some(".env[1].value")
        );
    }

    #[test]
    fn stamp_changes_when_the_body_drops_a_field() {
        let mut svc = Service::default();
        svc.metadata.name = Some("a".into());
        svc.metadata.labels = Some([("x".to_string(), "1".to_string())].into());
        let with_label = stamp(&svc);
        svc.metadata.labels = None;
        let without = stamp(&svc);
        let hash =
            |s: &Service| s.metadata.annotations.as_ref().unwrap()[APPLIED_ANNOTATION].clone();
        assert_ne!(hash(&with_label), hash(&without));
        // What the server keeps after the first apply still holds the old body: only the
        // annotation tells that the label was dropped.
        let server = serde_json::to_value(&with_label).unwrap();
        assert!(!holds(&server, &serde_json::to_value(&without).unwrap()));
        assert!(holds(&server, &serde_json::to_value(&with_label).unwrap()));
        assert_eq!(hash(&stamp(&svc)), hash(&without), "deterministic");
    }
}

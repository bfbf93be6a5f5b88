//! Who may read the API: the caller's bearer token is checked with a TokenReview, and each
//! namespace it reads with a SubjectAccessReview (`get`/`list` on `agentexecutions.agentops.dev`),
//! the way kube-rbac-proxy does. Answers are kept for a short while so that a dashboard polling
//! the API does not turn every request into two API calls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};

/// How long an answer of the API server is reused.
const TTL: Duration = Duration::from_secs(30);
/// Entries kept per cache; a full cache is emptied (simple, and bounded).
const MAX_ENTRIES: usize = 4096;

/// A cache of answers, each with the time it was given.
type Answers<K, V> = Mutex<HashMap<K, (Instant, V)>>;

/// Checks callers against the cluster's own authentication and RBAC.
pub struct Authorizer {
    client: kube::Client,
    /// Token → user (None: not accepted).
    users: Answers<String, Option<UserInfo>>,
    /// (user, namespace, verb) → allowed.
    decisions: Answers<(String, String, &'static str), bool>,
}

/// The API server could not be asked.
#[derive(Debug, thiserror::Error)]
#[error("cannot check the caller with the Kubernetes API: {0}")]
pub struct AuthError(#[from] kube::Error);

fn fresh<K: std::hash::Hash + Eq, V: Clone>(map: &Answers<K, V>, key: &K) -> Option<V> {
    let map = map.lock().ok()?;
    map.get(key).filter(|(at, _)| at.elapsed() < TTL).map(|(_, v)| v.clone())
}

fn keep<K: std::hash::Hash + Eq, V>(map: &Answers<K, V>, key: K, value: V) {
    if let Ok(mut map) = map.lock() {
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, (Instant::now(), value));
    }
}

impl Authorizer {
    /// An authorizer that asks the API server `client` talks to.
    pub fn new(client: kube::Client) -> Self {
        Self { client, users: Default::default(), decisions: Default::default() }
    }

    /// The user a bearer token belongs to; None when the API server does not accept it.
    pub async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, AuthError> {
        if let Some(user) = fresh(&self.users, &token.to_string()) {
            return Ok(user);
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: None },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let user = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .filter(|u| u.username.as_deref().is_some_and(|n| !n.is_empty()));
        keep(&self.users, token.to_string(), user.clone());
        Ok(user)
    }

    /// Whether `user` may `verb` (get, list) AgentExecutions in `namespace` ("" for every namespace).
    pub async fn allowed(&self, user: &UserInfo, namespace: &str, verb: &'static str) -> Result<bool, AuthError> {
        let name = user.username.clone().unwrap_or_default();
        let key = (name.clone(), namespace.to_string(), verb);
        if let Some(yes) = fresh(&self.decisions, &key) {
            return Ok(yes);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(name),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("agentops.dev".into()),
                    resource: Some("agentexecutions".into()),
                    namespace: Some(namespace.to_string()).filter(|n| !n.is_empty()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer =
            Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let yes = answer.status.is_some_and(|s| s.allowed && s.denied != Some(true));
        keep(&self.decisions, key, yes);
        Ok(yes)
    }
}

/// Whether `s` is a DNS-1123 label (a namespace name): lowercase alphanumerics and `-`,
/// starting and ending with an alphanumeric, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `s` is a DNS-1123 subdomain (an object name): labels joined by dots, at most 253.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_1123() {
        for ok in ["ns", "a-b", "team-1", "x"] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a%2Fb", "a?b", "a.b", "..", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("my.execution-1"));
        for bad in ["a/b", "a..b", ".a", "secrets?x", "a b"] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}

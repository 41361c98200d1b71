//! Who may call: bearer tokens (the submit token for `JobService`, the worker token for
//! `WorkerService`; distinct, so a compromised worker node cannot submit or cancel jobs), the
//! per-worker secrets that tell one worker from another (the worker token is on every node, so
//! it proves only that the caller is some worker), and the per-generation ring keys that keep
//! everyone else out of a generation's TCP ring.

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Submitter,
    Worker,
}

impl Role {
    fn service(self) -> &'static str {
        match self {
            Role::Submitter => "JobService (submit, status, cancel, resume)",
            Role::Worker => "WorkerService",
        }
    }
}

#[derive(Clone)]
pub struct Tokens {
    pub submit: String,
    pub worker: String,
    /// A token that may only read the status page and its data (never submit or train).
    pub read: Option<String>,
}

/// A worker as it names itself on a call: its id and the secret its registration returned.
pub type WorkerIdentity = ladder_proto::v1::WorkerIdentity;

/// A worker's secret, made at registration: the worker is told the secret, the store keeps
/// only its SHA-256 (a copy of the store does not let anyone act as a worker).
pub struct WorkerSecret {
    pub secret: String,
    pub sha256: String,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system gives random numbers");
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(text: &str) -> String {
    hex(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

impl WorkerSecret {
    pub fn generate() -> WorkerSecret {
        let secret = hex(&random_bytes::<32>());
        WorkerSecret {
            sha256: sha256_hex(&secret),
            secret,
        }
    }

    /// Whether `presented` is the secret whose SHA-256 is `sha256` (never for an empty hash).
    pub fn matches(sha256: &str, presented: &str) -> bool {
        !sha256.is_empty() && same(&sha256_hex(presented), sha256)
    }
}

/// A new generation's ring key: 32 random bytes.
pub fn ring_key() -> Vec<u8> {
    random_bytes::<32>().to_vec()
}

/// Compares the two strings' SHA-256 digests without an early exit, so response time says
/// nothing about a token: neither a prefix it shares nor its length (the digests are always 32
/// bytes, and hashing the presented string tells only what the caller already knows).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (
        digest::digest(&digest::SHA256, a.as_bytes()),
        digest::digest(&digest::SHA256, b.as_bytes()),
    );
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Tokens {
    /// Whether `presented` may read the status page's data: the submit token or the read
    /// token (the worker token, on every node, may not).
    pub fn may_read(&self, presented: &str) -> bool {
        same(presented, &self.submit)
            || self
                .read
                .as_deref()
                .is_some_and(|read| same(presented, read))
    }

    /// An interceptor admitting only `role`'s token.
    pub fn require(
        &self,
        role: Role,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let tokens = self.clone();
        move |request: Request<()>| {
            let Some(header) = request.metadata().get("authorization") else {
                return Err(Status::unauthenticated(
                    "missing bearer token: set LADDER_TOKEN or pass --token",
                ));
            };
            let presented = header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "malformed authorization header: expected `Bearer TOKEN`",
                    )
                })?;
            let (mine, other) = match role {
                Role::Submitter => (&tokens.submit, &tokens.worker),
                Role::Worker => (&tokens.worker, &tokens.submit),
            };
            if same(presented, mine) {
                Ok(request)
            } else if same(presented, other) {
                let other_role = if role == Role::Submitter {
                    Role::Worker
                } else {
                    Role::Submitter
                };
                Err(Status::permission_denied(format!(
                    "this token is for {}; it may not use {}",
                    other_role.service(),
                    role.service()
                )))
            } else {
                Err(Status::unauthenticated("invalid token"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_secret_matches_only_itself() {
        let a = WorkerSecret::generate();
        let b = WorkerSecret::generate();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 64);
        assert!(WorkerSecret::matches(&a.sha256, &a.secret));
        assert!(!WorkerSecret::matches(&a.sha256, &b.secret));
        assert!(!WorkerSecret::matches(&a.sha256, ""));
        assert!(
            !WorkerSecret::matches("", ""),
            "a record without a hash never matches"
        );
        assert_eq!(ring_key().len(), 32);
        assert_ne!(ring_key(), ring_key());
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}

//! Bearer tokens: the submit token for `JobService`, the worker token for `WorkerService`.
//! The two are distinct, so a compromised worker node cannot submit or cancel jobs.

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
}

/// Compares without an early exit, so response time says nothing about a token's prefix.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Tokens {
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
    fn tokens_compare_exactly() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}

//! The worker's session with the coordinator: one connection to whichever coordinator answers
//! (made again after a transport failure, trying every URL), and the one way a call is retried
//! while the coordinator restarts or fails over ([`Session::call_retrying`]).

use ladder_proto::client::{self, Authed};
use ladder_proto::v1::worker_service_client::WorkerServiceClient;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tonic::{Code, Response, Status};

pub type Client = WorkerServiceClient<Authed>;

/// Failures worth retrying: the coordinator is restarting, failing over or briefly overloaded.
pub fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Internal
    )
}

/// How a call is retried while the coordinator cannot be reached: the first pause, doubling up
/// to the longest, until an answer or `give_up_after`.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub first: Duration,
    pub longest: Duration,
    pub give_up_after: Option<Duration>,
}

impl Retry {
    /// Every `pause`, for at most `limit` (`None`: for as long as it takes).
    pub const fn every(pause: Duration, limit: Option<Duration>) -> Retry {
        Retry {
            first: pause,
            longest: pause,
            give_up_after: limit,
        }
    }

    /// From `first`, doubling up to `longest`, for as long as it takes.
    pub const fn backing_off(first: Duration, longest: Duration) -> Retry {
        Retry {
            first,
            longest,
            give_up_after: None,
        }
    }
}

pub struct Session {
    /// Comma-separated coordinator URLs.
    urls: String,
    token: String,
    tls_ca: Option<PathBuf>,
    client: Mutex<Option<Client>>,
}

impl Session {
    pub fn new(urls: String, token: String, tls_ca: Option<PathBuf>) -> Session {
        Session {
            urls,
            token,
            tls_ca,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, Status> {
        let mut slot = self.client.lock().await;
        if let Some(client) = &*slot {
            return Ok(client.clone());
        }
        let channel = client::connect(
            &self.urls,
            &self.token,
            "pass --token-file (a file holding the coordinator's worker token), or set LADDER_WORKER_TOKEN",
            self.tls_ca.as_deref(),
        )
        .await
        .map_err(|e| match e {
            client::ConnectError::Unreachable(m) => Status::unavailable(m),
            other => Status::invalid_argument(other.to_string()),
        })?;
        let client = WorkerServiceClient::new(channel);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// One call of `request` (`call` makes it with the client it is given). A transport
    /// failure forgets the connection, so that the next call tries every URL.
    pub async fn call<R, T, F, Fut>(&self, request: R, call: F) -> Result<T, Status>
    where
        F: FnOnce(Client, R) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let result = match self.client().await {
            Ok(client) => call(client, request).await.map(Response::into_inner),
            Err(status) => Err(status),
        };
        if let Err(status) = &result
            && matches!(status.code(), Code::Unavailable | Code::Unknown)
        {
            *self.client.lock().await = None;
        }
        result
    }

    /// Calls with `request` until the coordinator answers (or refuses for good), pausing as
    /// `retry` says while it cannot be reached; `what` names the call in the log.
    pub async fn call_retrying<R, T, F, Fut>(
        &self,
        retry: Retry,
        what: &str,
        request: R,
        call: F,
    ) -> Result<T, Status>
    where
        R: Clone,
        F: Fn(Client, R) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut pause = retry.first;
        let mut failures = 0u32;
        loop {
            match self.call(request.clone(), &call).await {
                Err(status)
                    if transient(&status)
                        && retry
                            .give_up_after
                            .is_none_or(|limit| started.elapsed() < limit) =>
                {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(
                            "{what}: the coordinator cannot be reached ({}); trying again",
                            status.message()
                        );
                    } else {
                        tracing::debug!("{what}: still unreachable: {}", status.message());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(retry.longest);
                }
                result => {
                    if failures > 0 && result.is_ok() {
                        tracing::info!("{what}: the coordinator answers again");
                    }
                    return result;
                }
            }
        }
    }
}

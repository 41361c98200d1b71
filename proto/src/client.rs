//! Connecting to a coordinator: the same for the CLI and the workers. A client may name several
//! coordinators (an etcd-backed control plane with standbys); they are tried in order. A standby
//! has bound its port, so connections to it succeed, but it answers nothing until it leads: a
//! coordinator counts as reached only once it answers the standard gRPC health check.

use std::path::Path;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no token: {0}")]
    NoToken(&'static str),
    #[error("the token has characters that cannot go in a header")]
    BadToken,
    #[error("invalid coordinator URL {url:?}: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot read the CA certificate {path}: {message}")]
    Ca { path: String, message: String },
    #[error("cannot reach the coordinator ({0})")]
    Unreachable(String),
}

/// The full chain of an error's causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `text` followed by `cause` and its causes, each told once: many errors already quote their
/// cause in their own message, and transport errors nest the same text several times.
pub fn with_causes(mut text: String, mut cause: Option<&dyn std::error::Error>) -> String {
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// How long a connected coordinator has to answer the health check.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the coordinator behind `channel` serves: it answers the health check (any gRPC
/// answer counts, so a coordinator without the health service passes too).
async fn answers(channel: Channel) -> Result<(), String> {
    let mut health = HealthClient::new(channel);
    let check = health.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(ANSWER_TIMEOUT, check).await {
        Err(_) => Err(format!(
            "connected, but no answer within {ANSWER_TIMEOUT:?} (a standby coordinator that does \
             not lead?)"
        )),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            Err(format!("unavailable: {}", status.message()))
        }
        Ok(Err(_)) => Ok(()),
    }
}

/// Connects to the first of the comma-separated `urls` that answers. `missing_token` says
/// where the token should have come from, for the error when it is empty.
pub async fn connect(
    urls: &str,
    token: &str,
    missing_token: &'static str,
    tls_ca: Option<&Path>,
) -> Result<Authed, ConnectError> {
    if token.is_empty() {
        return Err(ConnectError::NoToken(missing_token));
    }
    let bearer = Bearer(
        format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnectError::BadToken)?,
    );
    let (_, channel) = first_answering(urls, tls_ca).await?;
    Ok(InterceptedService::new(channel, bearer))
}

/// The first of the comma-separated `urls` whose coordinator serves (answers the health
/// check, which needs no token): for probes and scripts that wait for one.
pub async fn reach(urls: &str, tls_ca: Option<&Path>) -> Result<String, ConnectError> {
    first_answering(urls, tls_ca).await.map(|(url, _)| url)
}

async fn first_answering(
    urls: &str,
    tls_ca: Option<&Path>,
) -> Result<(String, Channel), ConnectError> {
    let mut failures = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let bad_url = |message: String| ConnectError::BadUrl {
            url: url.to_owned(),
            message,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad_url(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            // A coordinator whose machine vanished never closes its streams: pings find out.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if tls_ca.is_some() && url.starts_with("http://") {
            // The CA says the user expects TLS; going on in clear would send the token so.
            return Err(bad_url(
                "a CA certificate is given (--tls-ca / LADDER_TLS_CA), so use https://".to_owned(),
            ));
        }
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = tls_ca {
                let pem = std::fs::read(ca).map_err(|e| ConnectError::Ca {
                    path: ca.display().to_string(),
                    message: e.to_string(),
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| bad_url(error_chain(&e)))?;
        }
        match endpoint.connect().await {
            Ok(channel) => match answers(channel.clone()).await {
                Ok(()) => return Ok((url.to_owned(), channel)),
                Err(why) => failures.push(format!("{url}: {why}")),
            },
            Err(e) => failures.push(format!("{url}: {}", error_chain(&e))),
        }
    }
    if failures.is_empty() {
        return Err(ConnectError::BadUrl {
            url: urls.to_owned(),
            message: "no URL given".to_owned(),
        });
    }
    Err(ConnectError::Unreachable(failures.join("; ")))
}

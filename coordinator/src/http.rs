//! The coordinator's HTTP face, beside its gRPC API: `/metrics` for Prometheus, and the
//! status page (`/`) with the JSON it reads (`/api/...`).
//!
//! It follows the API's rules for where it may listen (loopback, or TLS with the same
//! certificate, or an explicit `--insecure-allow-remote`). `/metrics` needs no token, as
//! Prometheus scrapes expect: it tells job ids and names, states and rates, never a spec, a
//! path or a secret. The page itself is static; the data it reads needs the submit token or
//! the read token (`Authorization: Bearer`), which the page takes from its address's fragment
//! (`/#token=...`, never sent to a server) or asks for, and keeps for the browser tab only.

use crate::auth::Tokens;
use crate::clock::now_ms;
use crate::connections;
use crate::serving::Serving;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use ladder_proto::v1 as pb;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// How long a client may take over its TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one HTTP client may hold, beside [`crate::connections`]' limits: its request headers
/// must arrive within `headers` (a client trickling them in moves bytes, so the idle limit
/// does not end it), and no connection outlives `lifetime`, busy or not (clients reconnect;
/// no response streams).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub connections: connections::Limits,
    pub headers: Duration,
    pub lifetime: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connections: connections::Limits {
                max: 256,
                per_peer: 32,
                idle: Duration::from_secs(30),
            },
            headers: Duration::from_secs(10),
            lifetime: Duration::from_secs(600),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
struct Served {
    serving: Arc<Serving>,
    tokens: Tokens,
}

/// A 503 saying why no coordinator serves now (a standby, a store outage), as gRPC says it.
fn unavailable(served: &Served) -> Response {
    let why = served.serving.coordinator().err();
    let why = why.as_ref().map_or("", |status| status.message());
    (StatusCode::SERVICE_UNAVAILABLE, why.to_owned()).into_response()
}

pub fn router(serving: Arc<Serving>, tokens: Tokens) -> Router {
    let served = Served { serving, tokens };
    let api = Router::new()
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/workers", get(workers))
        .route_layer(middleware::from_fn_with_state(
            served.clone(),
            require_read_token,
        ));
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(served)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Scripts and styles of the page only; nothing from elsewhere, no framing.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 frame-ancestors 'none'",
            ),
        ],
        include_str!("status_page.html"),
    )
}

async fn metrics(State(served): State<Served>) -> Response {
    let Some(coordinator) = served.serving.leading() else {
        return unavailable(&served);
    };
    let text = coordinator.snapshot().rendered("/metrics", |shown| {
        crate::metrics::render(coordinator.metrics(), shown, now_ms()).into_bytes()
    });
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// Refuses a request for the page's data without the submit or the read token.
async fn require_read_token(
    State(served): State<Served>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let refused = match presented {
        Some(token) if served.tokens.may_read(token) => return next.run(request).await,
        Some(_) => "invalid token: the page reads with the submit token or the read token",
        None => "missing bearer token: the submit token or the read token",
    };
    (StatusCode::UNAUTHORIZED, refused).into_response()
}

/// `/api/jobs`' query: `ListJobsRequest`'s fields, by the same names.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct ListQuery {
    page_size: u32,
    page_token: String,
    include_ended: bool,
}

/// A page of jobs: `ListJobsResponse` as JSON, with the coordinator's clock.
async fn jobs(State(served): State<Served>, Query(query): Query<ListQuery>) -> Response {
    let Some(coordinator) = served.serving.leading() else {
        return unavailable(&served);
    };
    let request = pb::ListJobsRequest {
        page_size: query.page_size,
        page_token: query.page_token,
        include_ended: query.include_ended,
    };
    let asked = format!("/api/jobs {request:?}");
    let body = coordinator.snapshot().rendered(&asked, |shown| {
        let mut body = json!(shown.page(&request));
        body["now_ms"] = json!(now_ms());
        body.to_string().into_bytes()
    });
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// One job (`Job` as JSON) with its curves and its recipe card (`ladder plan`'s, absent when
/// its spec does not parse).
async fn job(State(served): State<Served>, Path(id): Path<String>) -> Response {
    let Some(coordinator) = served.serving.leading() else {
        return unavailable(&served);
    };
    match (coordinator.get(&id).await, coordinator.history(&id).await) {
        (Ok(job), Ok(history)) => {
            let steps_per_epoch = job.progress.map(|p| p.steps_per_epoch).filter(|&n| n > 0);
            let plan = ladder_core::spec::JobSpec::parse(&job.spec_toml, &job.id)
                .ok()
                .map(|spec| ladder_core::recipe::Card::new(&spec, steps_per_epoch));
            let body = json!({ "job": *job, "history": history, "plan": plan, "now_ms": now_ms() });
            Json(body).into_response()
        }
        (Err(e), _) | (_, Err(e)) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

/// Every worker: `ListWorkersResponse` as JSON.
async fn workers(State(served): State<Served>) -> Response {
    let Some(coordinator) = served.serving.leading() else {
        return unavailable(&served);
    };
    let body = coordinator.snapshot().rendered("/api/workers", |shown| {
        let workers = shown.workers.clone();
        json!(pb::ListWorkersResponse { workers })
            .to_string()
            .into_bytes()
    });
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A TLS server configuration from PEM files' contents (a certificate chain and its key).
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate chain does not parse: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the private key does not parse: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` resolves, each
/// connection within `limits`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let acceptor = tls.map(TlsAcceptor::from);
    let mut accepted = connections::accept(listener, limits.connections, "HTTP");
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            tcp = accepted.recv() => match tcp {
                Some(tcp) => tcp,
                None => return,
            },
            () = &mut shutdown => return,
        };
        let (acceptor, service) = (acceptor.clone(), TowerToHyperService::new(router.clone()));
        tokio::spawn(async move {
            let mut connection = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            connection
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.headers);
            let served = async {
                match acceptor {
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                connection
                                    .serve_connection(TokioIo::new(tls), service)
                                    .await
                            }
                            _ => Ok(()),
                        }
                    }
                    None => {
                        connection
                            .serve_connection(TokioIo::new(tcp), service)
                            .await
                    }
                }
            };
            if let Ok(Err(e)) = tokio::time::timeout(limits.lifetime, served).await {
                tracing::debug!("HTTP connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the server closes the connection, at most until `limit`.
    async fn closed_by(mut stream: tokio::net::TcpStream, limit: tokio::time::Instant) {
        let mut sink = Vec::new();
        tokio::time::timeout_at(limit, stream.read_to_end(&mut sink))
            .await
            .expect("the server closed the connection")
            .ok();
    }

    #[tokio::test]
    async fn a_silent_client_and_one_trickling_its_headers_are_let_go_while_others_are_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Slots and the idle limit are tested in crate::connections; here, that the server
        // applies them, and its own header timeout.
        let limits = ConnectionLimits {
            connections: connections::Limits {
                max: 4,
                per_peer: 4,
                idle: Duration::from_millis(400),
            },
            headers: Duration::from_millis(800),
            lifetime: Duration::from_secs(3),
        };
        let router = Router::new().route("/", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, None, limits, async {
            let _ = stopped.await;
        }));
        let opened = tokio::time::Instant::now();
        let silent = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: ladder\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        closed_by(silent, opened + Duration::from_secs(2)).await;
        assert!(opened.elapsed() >= Duration::from_millis(300));
        // A byte at a time, each within the idle limit: the header timeout lets it go.
        let mut trickling = tokio::net::TcpStream::connect(address).await.unwrap();
        let trickle = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nHost: ladder\r\n"
                .iter()
                .cycle()
                .take(40)
            {
                if trickling.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("4 s of headers were taken in");
        });
        tokio::time::timeout(Duration::from_secs(2), trickle)
            .await
            .expect("the trickling client was let go")
            .unwrap();
        let _ = stop.send(());
        server.await.unwrap();
    }
}

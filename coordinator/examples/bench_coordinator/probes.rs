//! What the benchmark measures the coordinator with from outside: its own latency histogram
//! (scraped from `/metrics`), and the HTTP reads a status page or a scraper makes.

use ladder_testkit::SUBMIT_TOKEN;

/// The coordinator's own histogram of Heartbeat latency, scraped from its `/metrics`:
/// cumulative counts by upper bound (seconds).
#[derive(Clone, Debug, Default)]
pub struct ServerHeartbeats(Vec<(f64, u64)>);

impl ServerHeartbeats {
    pub async fn scrape(http: &str) -> ServerHeartbeats {
        let http = http.to_owned();
        let text = tokio::task::spawn_blocking(move || ladder_testkit::http_get(&http, "/metrics"))
            .await
            .unwrap()
            .expect("scraping the coordinator's /metrics");
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("ladder_coordinator_rpc_duration_seconds_bucket{")
            else {
                continue;
            };
            if !rest.contains("method=\"Heartbeat\"") {
                continue;
            }
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let count = rest.rsplit(' ').next().and_then(|c| c.parse::<u64>().ok());
            if let (Some(le), Some(count)) = (le, count) {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                buckets.push((le, count));
            }
        }
        ServerHeartbeats(buckets)
    }

    /// The `q` quantile in milliseconds of the heartbeats between `earlier` and `self`,
    /// interpolated inside its bucket as Prometheus's `histogram_quantile` does.
    pub fn quantile_since(&self, earlier: &ServerHeartbeats, q: f64) -> Option<f64> {
        let counts: Vec<(f64, u64)> = self
            .0
            .iter()
            .map(|&(le, n)| {
                let before = earlier.0.iter().find(|(l, _)| *l == le).map_or(0, |b| b.1);
                (le, n - before)
            })
            .collect();
        let total = counts.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0);
        for (le, n) in counts {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return Some(lower * 1e3);
                }
                let share = (rank - below as f64) / (n - below).max(1) as f64;
                return Some((lower + (le - lower) * share) * 1e3);
            }
            (lower, below) = (le, n);
        }
        None
    }
}

/// `GET path` with the submit token on `connection` (kept alive between reads, as a browser
/// and Prometheus keep theirs; opened again from `from` when the server closed it); returns
/// the body's length.
pub async fn read(
    connection: &mut Option<tokio::io::BufReader<tokio::net::TcpStream>>,
    from: std::net::IpAddr,
    http: &str,
    path: &str,
) -> usize {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {SUBMIT_TOKEN}\r\n\r\n"
    );
    for _attempt in 0..2 {
        let stream = match connection {
            Some(stream) => stream,
            None => {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket
                    .bind((from, 0).into())
                    .expect("a loopback address of its own");
                let address = http.parse().unwrap();
                let stream = socket.connect(address).await.expect("reaching /api");
                connection.insert(tokio::io::BufReader::new(stream))
            }
        };
        let answered = async {
            stream.write_all(request.as_bytes()).await?;
            let (mut status, mut length) = (String::new(), 0);
            stream.read_line(&mut status).await?;
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await?;
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await?;
            std::io::Result::Ok((status, length))
        };
        match answered.await {
            Ok((status, length)) if !status.is_empty() => {
                assert!(status.starts_with("HTTP/1.1 200"), "GET {path}: {status}");
                return length;
            }
            // Closed by the server (its idle or lifetime limit): again on a new connection.
            _ => *connection = None,
        }
    }
    panic!("GET {path}: no answer on a new connection")
}

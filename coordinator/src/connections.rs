//! What one client may hold of the coordinator's two servers, gRPC and HTTP. The worker token
//! sits on every node and `/metrics` needs none, so anyone who reaches a port is a client:
//! connections that send nothing, or never finish their TLS handshake, must neither stay for
//! ever nor pile up until the process runs out of file descriptors, which would take the control
//! plane from every worker at once.
//!
//! Each server takes its connections from [`accept`]: at most `max` at once (more wait in the
//! listener's backlog, where they cost the process nothing), each one [`Watched`], which fails
//! its reads and writes once no byte has moved for `idle`, so that whatever serves it (tonic,
//! hyper, a TLS handshake) ends it. A live client never looks idle: the gRPC server pings every
//! connection more often than that (HTTP/2 keep-alive, answered by every client's library).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max: usize,
    /// Connections served at once from one address: one host cannot take every slot. A
    /// newcomer past it is closed at once.
    pub per_peer: usize,
    /// A connection on which no byte moved for this long is ended.
    pub idle: Duration,
}

/// The connections open from each address, and one of them held: counted off when dropped.
struct PeerSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerSlot {
    /// A slot for `peer`, if it holds fewer than `cap`.
    fn take(
        open: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        peer: IpAddr,
        cap: usize,
    ) -> Option<PeerSlot> {
        let mut counts = open.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(peer).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            open: open.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// The connections `listener` accepts, each within `limits`, until the receiver is dropped.
/// What `what` names (the server) is said in the log when accepting fails.
pub fn accept(
    listener: TcpListener,
    limits: Limits,
    what: &'static str,
) -> mpsc::Receiver<Watched<TcpStream>> {
    let (accepted, connections) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(limits.max));
    let peers = Arc::new(Mutex::new(HashMap::new()));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                () = accepted.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                result = listener.accept() => match result {
                    Ok((tcp, from)) => (tcp, from.ip()),
                    Err(e) => {
                        // Out of file descriptors, say: wait a little rather than spin.
                        tracing::warn!("{what} listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = accepted.closed() => return,
            };
            let Some(peer_slot) = PeerSlot::take(&peers, peer, limits.per_peer) else {
                tracing::debug!(%peer, "{what}: refused a connection past its address's {}", limits.per_peer);
                continue;
            };
            // Small requests and answers go out at once (heartbeats, long polls).
            let _ = tcp.set_nodelay(true);
            if accepted
                .send(Watched::new(tcp, limits.idle, (slot, peer_slot)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    connections
}

/// A connection that ends itself once no byte has moved on it for its idle limit, holding its
/// slot among the [`Limits::max`] until it is dropped.
pub struct Watched<IO> {
    io: IO,
    idle: Duration,
    moved: Instant,
    /// Fires at `moved + idle`, or earlier when bytes moved since it was set (then it is set
    /// again: moving bytes costs no timer update).
    timer: Pin<Box<Sleep>>,
    _slot: (OwnedSemaphorePermit, PeerSlot),
}

impl<IO> Watched<IO> {
    fn new(io: IO, idle: Duration, slot: (OwnedSemaphorePermit, PeerSlot)) -> Watched<IO> {
        let moved = Instant::now();
        Watched {
            io,
            idle,
            moved,
            timer: Box::pin(tokio::time::sleep_until(moved + idle)),
            _slot: slot,
        }
    }

    /// An error once the connection has been idle too long; otherwise its waker is woken then.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let due = self.moved + self.idle;
            if Instant::now() >= due {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved for {} s", self.idle.as_secs_f32()),
                ));
            }
            self.timer.as_mut().reset(due);
        }
        Ok(())
    }

    /// `polled`, noting that bytes moved when `moved` says so, or the idle error in place of
    /// waiting once the connection has been idle too long.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Ok(value)) => {
                if moved(&value) {
                    self.moved = Instant::now();
                }
                Poll::Ready(Ok(value))
            }
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            failed => failed,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = buf.filled().len() > before;
        this.watch(cx, polled, |()| read)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled, |&written| written > 0)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled, |()| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Watched<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Raises this process's soft limit on open files to its hard limit, as servers do (a
/// coordinator holds a connection per worker, and the usual soft limit is 1,024); returns the
/// limit in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            } else {
                tracing::warn!(
                    "cannot raise the open-file limit from {}: {}",
                    limit.rlim_cur,
                    io::Error::last_os_error()
                );
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on `limits`' connections: what it does until each connection ends.
    async fn echo(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut connections = accept(listener, limits, "test");
        tokio::spawn(async move {
            while let Some(mut connection) = connections.recv().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = connection.read(&mut buf).await {
                        if connection.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn silent_connections_are_ended_and_hold_no_slot_for_ever_while_a_busy_one_stays() {
        let idle = Duration::from_millis(300);
        let address = echo(Limits {
            max: 3,
            per_peer: 3,
            idle,
        })
        .await;
        let opened = Instant::now();
        let mut busy = TcpStream::connect(address).await.unwrap();
        let silent = [
            TcpStream::connect(address).await.unwrap(),
            TcpStream::connect(address).await.unwrap(),
        ];
        // A fourth waits for a slot (the backlog), until the silent ones are let go.
        let waiting = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"late").await.unwrap();
            let mut answer = [0u8; 4];
            stream.read_exact(&mut answer).await.unwrap();
            (answer, Instant::now())
        });
        // The busy one talks more often than the idle limit, for three times as long.
        for _ in 0..9 {
            busy.write_all(b"ping").await.unwrap();
            let mut answer = [0u8; 4];
            busy.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"ping");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for mut stream in silent {
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
                .await
                .expect("the silent connection was ended")
                .ok();
            assert!(rest.is_empty());
        }
        let (answer, at) = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("served once a slot was free")
            .unwrap();
        assert_eq!(&answer, b"late");
        assert!(at - opened >= idle, "it waited for a slot");
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_the_slots() {
        let address = echo(Limits {
            max: 10,
            per_peer: 2,
            idle: Duration::from_secs(30),
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"hold").await.unwrap();
            let mut answer = [0u8; 4];
            stream.read_exact(&mut answer).await.unwrap();
            held.push(stream);
        }
        // The third from the same address is closed at once.
        let mut third = TcpStream::connect(address).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut rest))
            .await
            .expect("closed at once")
            .ok();
        assert!(rest.is_empty());
        // Once one goes, another is served.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = TcpStream::connect(address).await.unwrap();
        again.write_all(b"next").await.unwrap();
        let mut answer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), again.read_exact(&mut answer))
            .await
            .expect("served")
            .unwrap();
        assert_eq!(&answer, b"next");
    }
}

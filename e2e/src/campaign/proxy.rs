//! An in-process TCP proxy for network faults (this kernel has no netem):
//! sidecars reach the coordinator through it, and the campaign can cut every
//! connection, delay traffic, or black-hole it (nothing passes, nothing is
//! closed: a partition as a stalled peer sees it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Forward nothing, close nothing.
    Blackhole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    mode: Mode,
    /// Bumped to close every open connection.
    generation: u64,
}

/// A running proxy.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(
            watch::channel(State {
                mode: Mode::Pass,
                generation: 0,
            })
            .0,
        );
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                tokio::spawn(connection(client, upstream, s.subscribe()));
            }
        });
        Ok(Proxy { addr, state, task })
    }

    /// Sets what happens to traffic from now on.
    pub fn set(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Closes every open connection (new ones are accepted).
    pub fn cut(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<State>) {
    let born = state.borrow().generation;
    // A black-holed connection is not even opened upstream yet.
    if state
        .wait_for(|s| s.mode != Mode::Blackhole || s.generation != born)
        .await
        .map(|s| s.generation != born)
        .unwrap_or(true)
    {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, state.clone(), born);
    let down = pump(sr, cw, state.clone(), born);
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = state.wait_for(|s| s.generation != born) => {}
    }
}

/// Copies `from` to `to` chunk by chunk, as the mode says, until either
/// side closes or the connection is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Hold the chunk while black-holed; drop it if cut meanwhile.
        let Ok(s) = state
            .wait_for(|s| s.mode != Mode::Blackhole || s.generation != born)
            .await
            .map(|s| *s)
        else {
            return;
        };
        if s.generation != born {
            return;
        }
        if let Mode::Delay(d) = s.mode {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> anyhow::Result<SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    async fn roundtrip(c: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        c.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        match tokio::time::timeout(wait, c.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_holds_and_cuts() -> anyhow::Result<()> {
        let p = Proxy::start(echo_server().await?).await?;
        let mut c = TcpStream::connect(p.addr).await?;
        let short = Duration::from_millis(300);
        assert_eq!(
            roundtrip(&mut c, short).await.as_deref(),
            Some(&b"ping"[..])
        );
        p.set(Mode::Blackhole);
        assert_eq!(roundtrip(&mut c, short).await, None, "nothing passes");
        p.set(Mode::Pass);
        // the held ping comes through once the hole closes
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await??;
        p.cut();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a cut closes the connection");
        let mut c = TcpStream::connect(p.addr).await?;
        assert!(
            roundtrip(&mut c, Duration::from_secs(2)).await.is_some(),
            "new ones work"
        );
        Ok(())
    }
}
